"""FP8 weights: quantisation recipes and the matmul paths a GPU offers.

Storage: float8 values (e4m3fn, or e5m2 in some files) with a float32 scale, one per tensor (ComfyUI's layouts) or
one per output row (our recipe when quantising a full-precision file on load: a row's outliers then cost only that
row's precision). value = float(w8) * scale.

Compute, chosen once per layer by what the device can do:
- "scaled_mm": GPUs with fp8 tensor cores (compute capability >= 8.9). Activations are quantised per token to e4m3
  (amax, scale and cast compiled into one fused kernel: unfused, they made the linears slower than bf16 on an H100)
  and multiplied by `torch._scaled_mm` with row-wise scales on both sides, accumulating in fp32.
- "weight-only": everywhere else (the CPU, older GPUs, e5m2 weights, layers marked full precision): the weight is
  dequantised to the compute dtype at use and multiplied in that dtype (W8A16). Its result equals the dequantised
  model's up to float rounding.
"""
from __future__ import annotations

import logging

import torch

from .fused import Fused

log = logging.getLogger(__name__)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def quantize(w: torch.Tensor, per_row: bool = True, dtype: torch.dtype = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (w8 [N, K] in `dtype`, float32 scale [N] or 0-dim) with w ~ w8.float() * scale."""
    wf = w.float()
    fmax = float(torch.finfo(dtype).max)
    amax = wf.abs().amax(dim=1) if per_row else wf.abs().amax()
    scale = (amax / fmax).clamp_min(torch.finfo(torch.float32).tiny)  # an all-zero row keeps scale > 0
    w8 = (wf / (scale[:, None] if per_row else scale)).clamp(-fmax, fmax).to(dtype)
    return w8, scale.float()


def dequantize(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 product, then one rounding to `dtype` (as the checkpoint readers dequantise on load)."""
    s = scale.float()
    s = s.reshape(-1, 1) if s.numel() > 1 else s.reshape(())
    return (w8.float() * s).to(dtype)


def scaled_mm_supported(device: torch.device) -> bool:
    """fp8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.x, 12.x)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9) and \
        hasattr(torch, "_scaled_mm")


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token e4m3 quantisation of activations x [M, K] -> (x8 [M, K], float32 scale [M, 1])."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12)
    scale = amax / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


# `_quantize_rows` compiled once (dynamic in M) into a fused kernel on CUDA; eager where compiling fails.
quantize_rows = Fused(_quantize_rows, "fp8 activation quantisation")


def scaled_mm_linear(x: torch.Tensor, w8: torch.Tensor, w_scale_row: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] (bf16/fp16/fp32) @ w8 [N, K]^T with w_scale_row [1, N] float32 -> [..., N] in x's dtype."""
    shape = x.shape
    x8, x_scale = quantize_rows(x.reshape(-1, shape[-1]))
    out_dtype = x.dtype if x.dtype != torch.float32 else torch.bfloat16
    out = torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale_row, bias=None, out_dtype=out_dtype)
    out = out.to(x.dtype)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.reshape(*shape[:-1], w8.shape[0])
