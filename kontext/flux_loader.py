"""`load_dit`: load a Flux DiT from any supported checkpoint layout, auto-detected, streamed tensor by tensor."""
from __future__ import annotations

import logging
import os

import torch

from .config import FluxConfig
from .dit import FluxDiT
from .errors import CheckpointError, InputError
from .flux_keys import bfl_plan, config_from_shapes, detect, diffusers_plan
from .weights import Checkpoint, load_plan
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

    `precision` ("bf16", "fp16", "fp32") overrides `dtype`; fp8-scaled files are dequantised on load.
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
        model = FluxDiT(config)
    names = [n for n, _ in model.named_parameters()]
    plan = bfl_plan(names, prefix) if layout == "bfl" else diffusers_plan(config, prefix)
    # With a prefix (an all-in-one checkpoint), tensors outside it belong to other models and are left alone.
    unused = {k for k in ckpt.weight_keys() if k.startswith(prefix)} - {k for src in plan.values() for k in src.keys}
    if unused:
        raise CheckpointError(ckpt.path, f"holds {len(unused)} tensors a Flux DiT does not have "
                                         f"(e.g. {sorted(unused)[0]!r}): a different or modified model?")
    log.info("loading Flux DiT (%s layout%s, %d+%d blocks, hidden %d) from %s as %s on %s", layout,
             ", fp8 scaled" if ckpt.is_fp8_scaled else "", config.depth, config.depth_single_blocks,
             config.hidden_size, ckpt.path, dtype, device)
    return load_plan(model, plan, ckpt, what="Flux DiT", device=device, dtype=dtype)


__all__ = ["load_dit", "FluxConfig"]
