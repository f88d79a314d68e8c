"""`load_dit`: load a Flux DiT from any supported checkpoint layout, auto-detected, streamed tensor by tensor."""
from __future__ import annotations

import logging
import os
from typing import Literal, Sequence, overload

import torch
from torch import nn

from .backend import DiTBackend, named
from .config import FluxConfig
from .dit import FluxDiT
from .errors import InputError
from .dit_file import DitFile, open_dit
from .flux_keys import QUANTIZABLE
from .formats import DENSE as DENSE_FORMAT, StoredQuant, WeightFormat, layer_format
from .ops import LayerFormats, set_formats
from .precision import Precision, resolve
from .weights import Checkpoint, Plan, Source, load_plan
from .weights.loading import as_device

log = logging.getLogger(__name__)


@overload
def load_dit(path: str | os.PathLike, device: str | torch.device = ..., dtype: torch.dtype | None = ...,
             precision: str | Precision | None = ..., loras: Sequence[tuple] = ..., lora_mode: str = ...,
             backend: Literal["torch"] = ..., engine: None = ...) -> FluxDiT: ...
@overload
def load_dit(path: str | os.PathLike, device: str | torch.device = ..., dtype: torch.dtype | None = ...,
             precision: str | Precision | None = ..., loras: Sequence[tuple] = ..., lora_mode: str = ...,
             backend: str = ..., engine: str | os.PathLike | None = ...) -> DiTBackend: ...


def load_dit(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             precision: str | Precision | None = None, loras: Sequence[tuple] = (), lora_mode: str = "auto",
             backend: str = "torch", engine: str | os.PathLike | None = None) -> DiTBackend:
    """Load a FLUX.1 (Kontext) DiT from a BFL, ComfyUI (prefixed, fp8_scaled, mixed fp8/NVFP4) or diffusers
    checkpoint.

    `precision` is "bf16", "fp16", "fp32", "fp8", "fp4", or None to keep the file's own format (see
    kontext.precision); `dtype` is the compute dtype of the quantised and as-stored cases. Quantised weights stay
    quantised in memory, bit for bit as in the file, and are used through kontext.ops' fp8 / fp4 layers.
    `loras` [(file, strength), ...] are applied after loading (see kontext.lora.apply.with_loras; every file is
    read and checked before the DiT is).

    Another registered `backend` (kontext.backend) loads its own model instead: `backend="tensorrt"` runs a built
    engine (`engine`: its .plan or a folder of engines, see kontext.tensorrt); the file at `path` is then only
    hashed, so that an engine built from another model is refused as stale. It returns that backend's model (a
    kontext.backend.DiTBackend, used wherever the PyTorch DiT is), after refusing what the backend cannot do.
    """
    other = named(backend)
    if other.load is not None:
        other.capabilities.check_request(None, loras)
        return other.load(path, engine, precision)
    if engine is not None:
        raise InputError("an engine is run by backend='tensorrt' (--backend tensorrt); the torch backend takes none")
    device = as_device(device)
    if loras:
        from .lora.apply import check_loras

        check_loras(loras, lora_mode)
    prec = resolve(precision, dtype, device)
    dit = open_dit(path)
    if loras:  # read and checked against the model's shapes before any weight is loaded
        from .lora.apply import read_all

        loras = read_all(loras, dit.config)
    model = dit.meta_model(prec.compute)
    plan = dict(dit.plan)
    dit.check_unused()
    formats, quant_plan = layer_formats(dit, model, prec.format)
    set_formats(model, formats)
    plan.update(quant_plan)
    log.info("loading Flux DiT (%s layout, %d+%d blocks, hidden %d; %s) from %s, computing in %s on %s",
             dit.layout, dit.config.depth, dit.config.depth_single_blocks, dit.config.hidden_size,
             _count(formats), dit.path, prec.compute, device)
    model = load_plan(model, plan, dit.ckpt, what="Flux DiT", device=device, dtype=prec.compute)
    if loras:
        from .lora.apply import with_loras

        model = with_loras(model, loras, lora_mode)
    return model


def _count(formats: LayerFormats) -> str:
    """"36 fp8 linear layers" (or "no quantised linear layers"), for the log."""
    counts: dict[str, int] = {}
    for fmt, _ in formats.values():
        counts[fmt.name] = counts.get(fmt.name, 0) + 1
    return " and ".join(f"{n} {name}" for name, n in counts.items()) + " linear layers" if counts else \
        "no quantised linear layers"


def dit_config(path: str | os.PathLike | DitFile) -> FluxConfig:
    """The architecture of the DiT at `path` (or of a DitFile open already), from its header alone."""
    return open_dit(path).config


def layer_formats(dit: DitFile, model: nn.Module, want: WeightFormat | None) -> tuple[LayerFormats, Plan]:
    """Each linear layer's format (as stored, dequantised, or quantised on load) and its plan entries; `want` is the
    requested format (None: as stored)."""
    formats: dict[str, tuple[WeightFormat, dict]] = {}
    out: Plan = {}
    for name, module in model.named_modules():
        src = dit.plan.get(f"{name}.weight")
        if not isinstance(module, nn.Linear) or src is None:
            continue
        stored = dit.stored(name)
        have = stored.format if stored else DENSE_FORMAT
        target = have if want is None or (want.quantized and not name.startswith(QUANTIZABLE)) else want
        if not target.quantized:
            continue  # the plan's sources read (and dequantise) as they are
        if stored is not None and target == have:
            formats[name], entries = _as_stored(dit.ckpt, name, stored)
        else:
            if have.quantized:
                log.warning("%s: %s weights are dequantised and re-quantised to %s (lossy twice); load the "
                            "full-precision file for the best %s model", dit.path.name, have.name, target.name,
                            target.name)
            formats[name], entries = _quantize_on_load(name, module, src, target)
        out.update(entries)
    return formats, out


def _as_stored(ckpt: Checkpoint, name: str, q: StoredQuant) -> tuple[tuple[WeightFormat, dict], Plan]:
    options = {"input_scale": q.input_scale is not None, "full_precision": q.full_precision}
    entries: Plan = {f"{name}.weight": Source((q.weight,), "raw")}
    if q.input_scale is not None:
        entries[f"{name}.input_scale"] = Source((q.input_scale,), "scale")
    own, sources = q.format.stored_layer(ckpt, q)
    options.update(own)
    for leaf, (key, op) in sources.items():  # no key: a unit scale the file leaves implicit
        entries[f"{name}.{leaf}"] = Source((key,), op) if key else Source((), "unit")
    return (q.format, options), entries


def _quantize_on_load(name: str, layer: nn.Linear, src: Source,
                      fmt: WeightFormat) -> tuple[tuple[WeightFormat, dict], Plan]:
    entries = {f"{name}.{leaf}": Source(src.keys, src.op, quant=(fmt, leaf))
               for leaf in fmt.params(layer.out_features, layer.in_features)}
    return (fmt, fmt.layer_options(layer.out_features)), entries


__all__ = ["load_dit", "FluxConfig", "open_dit", "DitFile"]


def quantized_formats(model: nn.Module, fmt: WeightFormat) -> dict[str, tuple[WeightFormat, dict]]:
    """The quantise-on-load plan of a dense model for `set_formats`: the blocks' linear layers in `fmt` (fp8 with a
    scale per output row), as `load_dit(precision="fp8"|"fp4")` makes them."""
    return {n: (fmt, fmt.layer_options(m.out_features))
            for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(QUANTIZABLE)}


def resident_bytes(config: FluxConfig, precision: str = "bf16", dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes the DiT's weights take in memory when a full-precision file is loaded at `precision`, counted on the
    `meta` device (no weights needed): quantised tensors at their own size, the rest in the compute dtype."""
    with torch.device("meta"):
        model = FluxDiT(config, dtype=dtype)
    prec = resolve(precision, dtype, torch.device("cpu"))
    if prec.format is not None and prec.format.quantized:
        set_formats(model, quantized_formats(model, prec.format))
    dtype = prec.compute
    total = 0
    for module in model.modules():
        total += (layer_format(module) or DENSE_FORMAT).resident_bytes(module, dtype)
    return total
