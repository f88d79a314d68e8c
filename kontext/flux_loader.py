"""`load_dit`: load a Flux DiT from any supported checkpoint layout, auto-detected, streamed tensor by tensor."""
from __future__ import annotations

import logging
import math
import os
from typing import Sequence

import torch
from torch import nn

from .config import FluxConfig
from .dit import FluxDiT
from .errors import CheckpointError, InputError
from .flux_keys import bfl_plan, config_from_shapes, detect, diffusers_plan
from .ops import set_formats
from .precision import DENSE, dense_name, resolve
from .weights import Checkpoint, Plan, Source, load_plan
from .weights.checkpoint import resolve_model_path
from .weights.identify import describe
from .weights.loading import as_device

log = logging.getLogger(__name__)

# Linear layers quantised when a full-precision file is loaded as fp8 or fp4: every layer of the transformer blocks
# (99% of the weights). The embedders (img_in, txt_in, time_in, vector_in, guidance_in) and the final layer stay as
# stored: they are under 1% of the bytes, and they set the scale of everything downstream.
QUANTIZABLE = ("double_blocks.", "single_blocks.")
BACKENDS = ("torch", "tensorrt")


def load_dit(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             precision: str | None = None, loras: Sequence[tuple] = (), lora_mode: str = "auto",
             backend: str = "torch", engine: str | os.PathLike | None = None) -> FluxDiT:
    """Load a FLUX.1 (Kontext) DiT from a BFL, ComfyUI (prefixed, fp8_scaled, mixed fp8/NVFP4) or diffusers
    checkpoint.

    `precision` is "bf16", "fp16", "fp32", "fp8", "fp4", or None to keep the file's own format (see
    kontext.precision); `dtype` is the compute dtype of the quantised and as-stored cases. Quantised weights stay
    quantised in memory, bit for bit as in the file, and are used through kontext.ops' fp8 / fp4 layers.
    `loras` [(file, strength), ...] are applied after loading (see kontext.lora.apply.with_loras; every file is
    read and checked before the DiT is).

    `backend="tensorrt"` runs a built engine instead (`engine`: its .plan or a folder of engines, see
    kontext.tensorrt): the file at `path` is then only hashed, so that an engine built from another model is
    refused as stale; it returns a kontext.tensorrt.runtime.EngineDiT, used wherever a FluxDiT is.
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "tensorrt":
        return _load_engine(path, engine, precision, loras)
    if engine is not None:
        raise InputError("an engine is run by backend='tensorrt' (--backend tensorrt); the torch backend takes none")
    device = as_device(device)
    if loras:
        from .lora.apply import check_loras

        check_loras(loras, lora_mode)
    prec = resolve(precision, dtype, device)
    ckpt = Checkpoint(resolve_model_path(path, "transformer"))
    found = detect(ckpt.weight_keys())
    if found is None:
        kind = describe(ckpt.weight_keys())
        raise CheckpointError(ckpt.path, f"is not a Flux DiT checkpoint: it looks like {kind}",
                              "a FLUX.1 Kontext diffusion model (BFL, ComfyUI fp8_scaled or diffusers layout)")
    layout, prefix = found
    config = config_from_shapes(ckpt, layout, prefix)
    if loras:  # read and checked against the model's shapes before any weight is loaded
        from .lora.apply import read_all

        loras = read_all(loras, config)
    with torch.device("meta"):
        model = FluxDiT(config, dtype=prec.compute)
    names = [n for n, _ in model.named_parameters()]
    plan = bfl_plan(names, prefix) if layout == "bfl" else diffusers_plan(config, prefix)
    # With a prefix (an all-in-one checkpoint), tensors outside it belong to other models and are left alone.
    unused = {k for k in ckpt.weight_keys() if k.startswith(prefix)} - {k for src in plan.values() for k in src.keys}
    if unused:
        raise CheckpointError(ckpt.path, f"holds {len(unused)} tensors a Flux DiT does not have "
                                         f"(e.g. {sorted(unused)[0]!r}): a different or modified model?")
    formats, quant_plan = layer_formats(ckpt, model, plan, prec.storage)
    set_formats(model, formats)
    plan.update(quant_plan)
    counts = {f: sum(1 for v in formats.values() if v[0] == f) for f in ("fp8", "fp4")}
    log.info("loading Flux DiT (%s layout, %d+%d blocks, hidden %d; %d fp8 and %d fp4 linear layers) from %s, "
             "computing in %s on %s", layout, config.depth, config.depth_single_blocks, config.hidden_size,
             counts["fp8"], counts["fp4"], ckpt.path, prec.compute, device)
    model = load_plan(model, plan, ckpt, what="Flux DiT", device=device, dtype=prec.compute)
    if loras:
        from .lora.apply import with_loras

        model = with_loras(model, loras, lora_mode)
    return model


def _load_engine(path, engine, precision: str | None, loras: Sequence[tuple]):
    from .tensorrt import check_request
    from .tensorrt.runtime import load_engine

    check_request(None, loras)
    if engine is None:
        raise InputError("backend='tensorrt' needs the engine: its .plan file or the folder of engines "
                         "(--engine DIR; `python -m kontext build-engine` makes one)")
    if precision == "auto":
        precision = None
    ckpt = Checkpoint(resolve_model_path(path, "transformer"))
    return load_engine(engine, source=ckpt.path, precision=precision, preferred=stored_precision(ckpt))


def stored_precision(ckpt: Checkpoint) -> str:
    """The precision a file stores its DiT in: fp4 or fp8 when any layer is so quantised, else its weights' dtype."""
    fmts = {q.fmt for q in ckpt.quantized.values()}
    if fmts:
        return "fp4" if "fp4" in fmts else "fp8"
    dtypes = {ckpt.dtype(k) for k in ckpt.weight_keys() if k.endswith(".weight")}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.bfloat16  # a mixed file: name it by the GPU default
    return dense_name(dtype) if dtype in DENSE.values() else "bf16"


def dit_config(path: str | os.PathLike) -> FluxConfig:
    """The architecture of the DiT at `path`, from its header alone (nothing is loaded)."""
    ckpt = Checkpoint(resolve_model_path(path, "transformer"))
    found = detect(ckpt.weight_keys())
    if found is None:
        raise CheckpointError(ckpt.path, f"is not a Flux DiT checkpoint: it looks like {describe(ckpt.weight_keys())}")
    return config_from_shapes(ckpt, *found)


def layer_formats(ckpt: Checkpoint, model: FluxDiT, plan: Plan,
                  storage: str | None) -> tuple[dict[str, tuple[str, dict]], Plan]:
    """Each linear layer's format (as stored, dequantised, or quantised on load) and its plan entries."""
    formats: dict[str, tuple[str, dict]] = {}
    out: Plan = {}
    for name, module in model.named_modules():
        src = plan.get(f"{name}.weight")
        if not isinstance(module, nn.Linear) or src is None:
            continue
        stored = ckpt.quantized.get(src.keys[0]) if src.op == "copy" else None
        have = stored.fmt if stored else "dense"
        want = have if storage is None or (storage != "dense" and not name.startswith(QUANTIZABLE)) else storage
        if want == "dense":
            continue  # the plan's sources read (and dequantise) as they are
        if want == have:
            formats[name], entries = _as_stored(ckpt, name, stored)
        else:
            if have != "dense":
                log.warning("%s: %s weights are dequantised and re-quantised to %s (lossy twice); load the "
                            "full-precision file for the best %s model", ckpt.path.name, have, want, want)
            formats[name], entries = _quantize_on_load(name, module.out_features, src, want)
        out.update(entries)
    return formats, out


def _as_stored(ckpt: Checkpoint, name: str, q) -> tuple[tuple[str, dict], Plan]:
    options = {"input_scale": q.input_scale is not None, "full_precision": q.full_precision}
    entries: Plan = {f"{name}.weight": Source((q.weight,), "raw")}
    if q.input_scale is not None:
        entries[f"{name}.input_scale"] = Source((q.input_scale,), "scale")
    if q.fmt == "fp8":
        n = math.prod(ckpt.stored_shape(q.scale)) if q.scale else 1
        options.update(scale_shape=() if n == 1 else (n,), weight_dtype=ckpt.dtype(q.weight))
        entries[f"{name}.weight_scale"] = Source((q.scale,), "scale") if q.scale else Source((), "unit")
    else:
        entries[f"{name}.weight_scale"] = Source((q.scale,), "raw")
        entries[f"{name}.weight_scale_2"] = Source((q.scale_2,), "scale")
    return (q.fmt, options), entries


def _quantize_on_load(name: str, rows: int, src: Source, fmt: str) -> tuple[tuple[str, dict], Plan]:
    parts = ("weight", "scale") if fmt == "fp8" else ("weight", "block", "tensor")
    params = {"weight": "weight", "scale": "weight_scale", "block": "weight_scale", "tensor": "weight_scale_2"}
    entries = {f"{name}.{params[p]}": Source(src.keys, src.op, quant=(fmt, p)) for p in parts}
    options = {"scale_shape": (rows,)} if fmt == "fp8" else {}  # fp8: one scale per output row
    return (fmt, options), entries


__all__ = ["load_dit", "FluxConfig"]


def quantized_formats(model: FluxDiT, fmt: str) -> dict[str, tuple[str, dict]]:
    """The quantise-on-load plan of a dense model for `set_formats`: the blocks' linear layers in `fmt` (fp8 with a
    scale per output row), as `load_dit(precision="fp8"|"fp4")` makes them."""
    return {n: (fmt, {"scale_shape": (m.out_features,)} if fmt == "fp8" else {})
            for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(QUANTIZABLE)}


def resident_bytes(config: FluxConfig, precision: str = "bf16", dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes the DiT's weights take in memory when a full-precision file is loaded at `precision`, counted on the
    `meta` device (no weights needed): quantised tensors at their own size, the rest in the compute dtype."""
    with torch.device("meta"):
        model = FluxDiT(config, dtype=dtype)
    if precision in ("fp8", "fp4"):
        set_formats(model, quantized_formats(model, precision))
    elif precision in DENSE:
        dtype = DENSE[precision]
    total = 0
    for module in model.modules():
        for leaf, p in module.named_parameters(recurse=False):
            quantised = getattr(module, "fmt", "dense") != "dense" and leaf != "bias"
            total += p.numel() * (p.element_size() if quantised else dtype.itemsize)
    return total
