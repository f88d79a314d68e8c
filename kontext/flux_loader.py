"""`load_dit`: load a Flux DiT from any supported checkpoint layout, auto-detected, streamed tensor by tensor."""
from __future__ import annotations

import logging
import math
import os

import torch
from torch import nn

from .config import FluxConfig
from .dit import FluxDiT
from .errors import CheckpointError, InputError
from .flux_keys import bfl_plan, config_from_shapes, detect, diffusers_plan
from .ops import FP8_DTYPES, set_formats
from .weights import Checkpoint, Plan, Source, load_plan
from .weights.checkpoint import resolve_model_path
from .weights.identify import describe
from .weights.loading import as_device

log = logging.getLogger(__name__)

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_dtype(dtype: torch.dtype | None, precision: str | None, device: torch.device) -> torch.dtype:
    if precision not in (None, "auto"):
        if precision not in PRECISIONS:
            hint = " (fp8 compute is not available yet: fp8 files are dequantised on load)" if \
                str(precision).lower().startswith(("fp8", "fp4", "nvfp4", "int")) else ""
            raise InputError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)} (or None)"
                             + hint)
        return PRECISIONS[precision]
    dtype = dtype or default_dtype(device)
    if not isinstance(dtype, torch.dtype) or dtype not in PRECISIONS.values():
        raise InputError(f"unsupported compute dtype {dtype}; expected torch.bfloat16, torch.float16 or torch.float32")
    return dtype


def load_dit(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             precision: str | None = None) -> FluxDiT:
    """Load a FLUX.1 (Kontext) DiT from a BFL, ComfyUI (prefixed, fp8_scaled) or diffusers checkpoint.

    `dtype` (or `precision`: "bf16", "fp16", "fp32") is the compute dtype. Weights a file stores in fp8 stay fp8 in
    memory, with their scales, and are dequantised layer by layer at use (see kontext.ops).
    """
    device = as_device(device)
    dtype = resolve_dtype(dtype, precision, device)
    ckpt = Checkpoint(resolve_model_path(path, "transformer"))
    found = detect(ckpt.weight_keys())
    if found is None:
        kind = describe(ckpt.weight_keys())
        raise CheckpointError(ckpt.path, f"is not a Flux DiT checkpoint: it looks like {kind}",
                              "a FLUX.1 Kontext diffusion model (BFL, ComfyUI fp8_scaled or diffusers layout)")
    layout, prefix = found
    config = config_from_shapes(ckpt, layout, prefix)
    with torch.device("meta"):
        model = FluxDiT(config, dtype=dtype)
    names = [n for n, _ in model.named_parameters()]
    plan = bfl_plan(names, prefix) if layout == "bfl" else diffusers_plan(config, prefix)
    stored = stored_formats(ckpt, model, plan)
    set_formats(model, stored)
    plan.update(quantized_plan(ckpt, plan, stored))
    # With a prefix (an all-in-one checkpoint), tensors outside it belong to other models and are left alone.
    unused = {k for k in ckpt.weight_keys() if k.startswith(prefix)} - {k for src in plan.values() for k in src.keys}
    if unused:
        raise CheckpointError(ckpt.path, f"holds {len(unused)} tensors a Flux DiT does not have "
                                         f"(e.g. {sorted(unused)[0]!r}): a different or modified model?")
    log.info("loading Flux DiT (%s layout, %d+%d blocks, hidden %d, %d fp8 linear layers) from %s, computing in %s "
             "on %s", layout, config.depth, config.depth_single_blocks, config.hidden_size, len(stored), ckpt.path,
             dtype, device)
    return load_plan(model, plan, ckpt, what="Flux DiT", device=device, dtype=dtype)


def stored_formats(ckpt: Checkpoint, model: FluxDiT, plan: Plan) -> dict[str, tuple[str, dict]]:
    """The linear layers whose weight the file stores in fp8, with what their fp8 layer needs to hold it as is.

    Only single-tensor weights stay quantised; a weight the loader must assemble (diffusers' separate q, k, v)
    is dequantised and joined, as before."""
    formats = {}
    for name, module in model.named_modules():
        src = plan.get(f"{name}.weight")
        if not isinstance(module, nn.Linear) or src is None or src.op != "copy" or src.keys[0] not in ckpt:
            continue
        if ckpt.dtype(src.keys[0]) in FP8_DTYPES:
            scale = ckpt.scale_key(src.keys[0])
            n = math.prod(ckpt.shape(scale)) if scale else 1
            formats[name] = ("fp8", {"scale_shape": () if n == 1 else (n,),
                                     "weight_dtype": ckpt.dtype(src.keys[0])})
    return formats


def quantized_plan(ckpt: Checkpoint, plan: Plan, formats: dict[str, tuple[str, dict]]) -> Plan:
    """Plan entries of the fp8 layers: the values as stored, and the scale (1 where the file stores none)."""
    out: Plan = {}
    for name in formats:
        key = plan[f"{name}.weight"].keys[0]
        scale = ckpt.scale_key(key)
        out[f"{name}.weight"] = Source((key,), "raw")
        out[f"{name}.weight_scale"] = Source((scale,), "scale") if scale else Source((), "unit")
    return out


__all__ = ["load_dit", "FluxConfig"]
