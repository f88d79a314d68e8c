"""Which weights of a checkpoint are stored quantised, and how: read off the header (and the few-byte `comfy_quant`
descriptions), validated before any weight is read.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import CheckpointError

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

FP8 = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
FORMATS = (*FP8, "nvfp4")
SVDQUANT_SUFFIXES = (".qweight", ".wscales", ".wzeros", ".smooth_factor", ".smooth_orig")


@dataclass(frozen=True)
class StoredQuant:
    """One quantised linear weight as stored: `fmt` "fp8" or "fp4", and the keys of its tensors."""

    fmt: str
    weight: str
    scale: str | None  # fp8: per tensor or per row (None: 1); fp4: the e4m3 block scales (tiled)
    scale_2: str | None = None  # fp4: the float32 tensor scale
    input_scale: str | None = None
    full_precision: bool = False


def _stem(key: str) -> str:
    return key[: -len(".weight")]


def _first(ckpt: "Checkpoint", stem: str, names: tuple[str, ...]) -> str | None:
    return next((f"{stem}.{n}" for n in names if f"{stem}.{n}" in ckpt.infos), None)


def comfy_quant_configs(ckpt: "Checkpoint") -> dict[str, dict]:
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


def _refuse_foreign(ckpt: "Checkpoint") -> None:
    svd = next((k for k in ckpt.infos if k.endswith(SVDQUANT_SUFFIXES)), None)
    if svd is not None:
        raise CheckpointError(ckpt.path, f"is an SVDQuant (Nunchaku) 4-bit model ('{svd}'), which this loader does "
                                         "not read", "bf16/fp16/fp32, fp8 or NVFP4 weights (use ComfyUI-nunchaku "
                                         "for SVDQuant files)")
    for key, info in ckpt.infos.items():
        if info.dtype == "I8" and key.endswith(".weight"):
            raise CheckpointError(ckpt.path, f"'{key}' is an int8 quantised weight, which is not supported",
                                  "bf16/fp16/fp32, fp8 or NVFP4 weights")


def describe_quantized(ckpt: "Checkpoint") -> dict[str, StoredQuant]:
    """Weight key -> StoredQuant for every quantised weight; CheckpointError naming the layer for anything wrong."""
    _refuse_foreign(ckpt)
    configs = comfy_quant_configs(ckpt)
    out: dict[str, StoredQuant] = {}
    for stem, conf in configs.items():
        key = f"{stem}.weight"
        if key not in ckpt.infos:
            raise CheckpointError(ckpt.path, f"layer '{stem}' has a quantisation description but no weight")
        out[key] = _mixed(ckpt, stem, conf)
    for key, info in ckpt.infos.items():
        if key in out or not key.endswith(".weight"):
            continue
        if ckpt.dtype(key) in FP8.values():
            out[key] = _scaled_fp8(ckpt, key, _full_precision_marker(ckpt))
        elif _first(ckpt, _stem(key), ("scale_weight", "weight_scale")):
            raise CheckpointError(ckpt.path, f"'{key}' is stored as {info.dtype} with a scale but no quantisation "
                                             "description: this format is not supported",
                                  "scaled fp8 weights, or ComfyUI's comfy_quant layers")
    return out


def _full_precision_marker(ckpt: "Checkpoint") -> bool:
    """ComfyUI's convention: a two-element `scaled_fp8` marker asks for full-precision matmuls (weight-only)."""
    marker = next((k for k in ckpt.infos if k == "scaled_fp8" or k.endswith(".scaled_fp8")), None)
    return marker is not None and math.prod(ckpt.infos[marker].shape) == 2


def _scaled_fp8(ckpt: "Checkpoint", key: str, full_precision: bool = False) -> StoredQuant:
    stem = _stem(key)
    scale = _first(ckpt, stem, ("scale_weight", "weight_scale"))
    if scale is not None:
        n, shape = math.prod(ckpt.infos[scale].shape), ckpt.infos[key].shape
        if n != 1 and (len(shape) != 2 or n != shape[0]):
            raise CheckpointError(ckpt.path, f"scale '{scale}' of shape {list(ckpt.infos[scale].shape)} does not fit "
                                             f"weight '{key}' of shape {list(shape)}", "one scale, or one per row")
    return StoredQuant("fp8", key, scale, input_scale=_first(ckpt, stem, ("scale_input", "input_scale")),
                       full_precision=full_precision)


def _mixed(ckpt: "Checkpoint", stem: str, conf: dict) -> StoredQuant:
    fmt, key = conf.get("format"), f"{stem}.weight"
    full = bool(conf.get("full_precision_matrix_mult", False))
    if fmt not in FORMATS:
        raise CheckpointError(ckpt.path, f"layer '{stem}' uses the quantisation format {fmt!r}, which is not "
                                         "supported", f"one of {', '.join(FORMATS)}")
    stored = ckpt.dtype(key)
    input_scale = _first(ckpt, stem, ("input_scale",))
    if fmt in FP8:
        if stored != FP8[fmt]:
            raise CheckpointError(ckpt.path, f"layer '{stem}' says {fmt} but its weight is stored as {stored}")
        scale = _first(ckpt, stem, ("weight_scale",))
        if scale is None:
            raise CheckpointError(ckpt.path, f"layer '{stem}' ({fmt}) has no 'weight_scale'", "its fp8 scale")
        if math.prod(ckpt.infos[scale].shape) != 1:
            raise CheckpointError(ckpt.path, f"layer '{stem}': weight_scale of shape "
                                             f"{list(ckpt.infos[scale].shape)}", "one per-tensor scale")
        return StoredQuant("fp8", key, scale, input_scale=input_scale, full_precision=full)
    from ..quant import nvfp4

    block, tensor = _first(ckpt, stem, ("weight_scale",)), _first(ckpt, stem, ("weight_scale_2",))
    for name, found in (("weight_scale", block), ("weight_scale_2", tensor)):
        if found is None:
            raise CheckpointError(ckpt.path, f"layer '{stem}' (nvfp4) has no '{name}'", "NVFP4 block and tensor "
                                                                                        "scales")
    shape = ckpt.infos[key].shape
    if len(shape) != 2:
        raise CheckpointError(ckpt.path, f"layer '{stem}' (nvfp4): weight of shape {list(shape)}", "[N, K/2]")
    try:
        nvfp4.check_shapes(_meta(ckpt, key), _meta(ckpt, block), _meta(ckpt, tensor), shape[0], 2 * shape[1])
    except ValueError as exc:
        raise CheckpointError(ckpt.path, f"layer '{stem}' (nvfp4): {exc}") from None
    return StoredQuant("fp4", key, block, tensor, input_scale, full)


def _meta(ckpt: "Checkpoint", key: str) -> torch.Tensor:
    """A meta tensor with the stored shape and dtype, so shape checks need no data."""
    info = ckpt.infos[key]
    from .checkpoint import DTYPES

    return torch.empty(info.shape, dtype=DTYPES[info.dtype], device="meta")


def logical_shape(q: StoredQuant, stored: tuple[int, ...]) -> tuple[int, ...]:
    """The dense weight's shape: NVFP4 packs two values a byte along K."""
    return (stored[0], 2 * stored[1]) if q.fmt == "fp4" else stored


def dequantize(ckpt: "Checkpoint", q: StoredQuant) -> torch.Tensor:
    """The weight as float32, as the file's own reader would compute it."""
    if q.fmt == "fp8":
        from ..quant import fp8

        scale = ckpt.raw(q.scale) if q.scale else torch.ones(())
        return fp8.dequantize(ckpt.raw(q.weight), scale, torch.float32)
    from ..quant import nvfp4

    packed = ckpt.raw(q.weight)
    return nvfp4.dequantize(packed, ckpt.raw(q.scale), ckpt.raw(q.scale_2).float().reshape(()),
                            (packed.shape[0], 2 * packed.shape[1]), torch.float32)
