"""Precisions, in one place: how the DiT's weights are stored and which dtype it computes in.

- "bf16", "fp16", "fp32": dense weights in that dtype, computing in it (quantised files are dequantised on load);
- "fp8", "fp4": fp8 (per-row scales) or NVFP4 weights; a full-precision file is quantised on load, a file already in
  that format is kept bit for bit; computing in `dtype` (default bf16 on GPUs, fp32 on the CPU);
- None or "auto": the weights as the file stores them (an fp8 file stays fp8), computing in `dtype`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import formats
from .errors import InputError
from .formats import WeightFormat

DENSE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTIZED = tuple(formats.QUANTIZED)  # "fp8", "fp4": the quantised formats' names
PRECISIONS = (*DENSE, *QUANTIZED)


def dense_name(dtype: torch.dtype) -> str:
    """"bf16", "fp16" or "fp32" for a dense dtype (DENSE's inverse)."""
    return next(name for name, d in DENSE.items() if d == dtype)


@dataclass(frozen=True)
class Precision:
    """A resolved precision: the weights' format (None: each layer as the file stores it) and the compute dtype."""

    format: WeightFormat | None
    compute: torch.dtype


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve(precision: "str | Precision | None", dtype: torch.dtype | None, device: torch.device,
            name: str = "precision") -> Precision:
    """The storage format and compute dtype a request means (`name` is the option's name in the message); a
    Precision resolved already is returned as it is."""
    if isinstance(precision, Precision):
        return precision
    if precision in (None, "auto"):
        return Precision(None, compute_dtype(dtype, device))
    if precision in DENSE:
        return Precision(formats.DENSE, DENSE[precision])
    if precision in formats.QUANTIZED:
        return Precision(formats.QUANTIZED[precision], compute_dtype(dtype, device))
    raise InputError(f"unknown {name} {precision!r}; expected one of {', '.join(PRECISIONS)} (or auto)")


def compute_dtype(dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    dtype = dtype or default_dtype(device)
    if not isinstance(dtype, torch.dtype) or dtype not in DENSE.values():
        raise InputError(f"unsupported compute dtype {dtype}; expected torch.bfloat16, torch.float16 or torch.float32")
    return dtype
