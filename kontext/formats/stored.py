"""Which weights of a checkpoint are stored quantised, and in which format: read off the header (and the few-byte
`comfy_quant` descriptions), validated before any weight is read. Each format checks its own layers.

Layouts understood:
- ComfyUI's fp8_scaled (`flux1-dev-kontext_fp8_scaled.safetensors`): float8 weights with `scale_weight` (or
  `weight_scale`), one per tensor or per row, an optional `scale_input`/`input_scale`, a `scaled_fp8` marker; also
  plain float8 weights without a scale (scale 1).
- ComfyUI's mixed precision: a `<layer>.comfy_quant` uint8 tensor holding JSON `{"format": ...,
  "full_precision_matrix_mult": bool}` (or the same per layer in the metadata entry `_quantization_metadata`), with
  `weight_scale` (fp8: per tensor; nvfp4: e4m3 block scales, tiled) and, for nvfp4, `weight_scale_2`.
Refused by name: other `comfy_quant` formats, int8 weights, SVDQuant (Nunchaku) files.
"""
from __future__ import annotations

import json
import math

from ..errors import CheckpointError
from . import COMFY_NAMES, FORMATS
from .base import StoredQuant, StoredTensors, first

SVDQUANT_SUFFIXES = (".qweight", ".wscales", ".wzeros", ".smooth_factor", ".smooth_orig")


def comfy_quant_configs(ckpt: StoredTensors) -> dict[str, dict]:
    """Layer stem -> its `comfy_quant` description, from the per-layer tensors and the metadata entry."""
    out: dict[str, dict] = {}
    meta = ckpt.metadata.get("_quantization_metadata")
    if meta:
        try:
            layers = json.loads(meta)["layers"]
            if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(ckpt.path, "metadata '_quantization_metadata' is not valid JSON with a 'layers' "
                                             "mapping") from None
        out.update(layers)
    for key in ckpt.infos:
        if key.endswith(".comfy_quant"):
            stem = key[: -len(".comfy_quant")]
            try:
                conf = json.loads(ckpt.raw(key).numpy().tobytes().decode("utf-8"))
                if not isinstance(conf, dict):
                    raise TypeError
            except (ValueError, TypeError, UnicodeDecodeError):
                raise CheckpointError(ckpt.path, f"'{key}' is not a readable quantisation description") from None
            out[stem] = conf
    return out


def _refuse_foreign(ckpt: StoredTensors) -> None:
    svd = next((k for k in ckpt.infos if k.endswith(SVDQUANT_SUFFIXES)), None)
    if svd is not None:
        raise CheckpointError(ckpt.path, f"is an SVDQuant (Nunchaku) 4-bit model ('{svd}'), which this loader does "
                                         "not read", "bf16/fp16/fp32, fp8 or NVFP4 weights (use ComfyUI-nunchaku "
                                         "for SVDQuant files)")
    for key, info in ckpt.infos.items():
        if info.dtype == "I8" and key.endswith(".weight"):
            raise CheckpointError(ckpt.path, f"'{key}' is an int8 quantised weight, which is not supported",
                                  "bf16/fp16/fp32, fp8 or NVFP4 weights")


def describe_quantized(ckpt: StoredTensors) -> dict[str, StoredQuant]:
    """Weight key -> StoredQuant for every quantised weight; CheckpointError naming the layer for anything wrong."""
    _refuse_foreign(ckpt)
    out: dict[str, StoredQuant] = {}
    for stem, conf in comfy_quant_configs(ckpt).items():
        key = f"{stem}.weight"
        if key not in ckpt.infos:
            raise CheckpointError(ckpt.path, f"layer '{stem}' has a quantisation description but no weight")
        out[key] = _mixed(ckpt, stem, conf)
    full = _full_precision_marker(ckpt)
    for key, info in ckpt.infos.items():
        if key in out or not key.endswith(".weight"):
            continue
        fmt = next((f for f in FORMATS.values() if f.unlabelled(ckpt, key)), None)
        if fmt is not None:
            out[key] = fmt.describe_unlabelled(ckpt, key, full)
        elif first(ckpt, key[: -len(".weight")], ("scale_weight", "weight_scale")):
            raise CheckpointError(ckpt.path, f"'{key}' is stored as {info.dtype} with a scale but no quantisation "
                                             "description: this format is not supported",
                                  "scaled fp8 weights, or ComfyUI's comfy_quant layers")
    return out


def _full_precision_marker(ckpt: StoredTensors) -> bool:
    """ComfyUI's convention: a two-element `scaled_fp8` marker asks for full-precision matmuls (weight-only)."""
    marker = next((k for k in ckpt.infos if k == "scaled_fp8" or k.endswith(".scaled_fp8")), None)
    return marker is not None and math.prod(ckpt.infos[marker].shape) == 2


def _mixed(ckpt: StoredTensors, stem: str, conf: dict) -> StoredQuant:
    name = conf.get("format")
    if not isinstance(name, str) or name not in COMFY_NAMES:
        raise CheckpointError(ckpt.path, f"layer '{stem}' uses the quantisation format {name!r}, which is not "
                                         "supported", f"one of {', '.join(COMFY_NAMES)}")
    return COMFY_NAMES[name].describe(ckpt, stem, name, bool(conf.get("full_precision_matrix_mult", False)))
