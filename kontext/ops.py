"""The DiT's linear layers: one factory, several weight formats.

Every linear layer of the DiT is made by `make_linear(fmt, ...)`, as ComfyUI's models take an `operations=` argument.
A layer keeps its weight in the format the checkpoint stores it in and computes in the activations' dtype:
- "dense": a floating-point weight (bf16, fp16, fp32), cast at use only if it differs from the input's dtype (so
  streamed or offloaded weights in another dtype still compute in the stated dtype);
- "fp8": float8 (e4m3fn or e5m2) values with a float32 scale (one per tensor, or one per output row), dequantised at
  use (weight-only), exactly as the checkpoint readers dequantise: `(w.float() * scale).to(dtype)`.
The model is first built with dense layers on the `meta` device; the loader then swaps in the formats the file holds
(`set_formats`) and hands each layer its tensors as stored. A new format (fp8 matmuls, NVFP4, a LoRA branch) is a new
class here and a name in FORMATS; nothing else in the model changes.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class Linear(nn.Linear):
    """A dense linear layer that computes in its input's dtype."""

    fmt = "dense"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if w.dtype != x.dtype:
            w = w.to(x.dtype)
            b = None if b is None else b.to(x.dtype)
        return F.linear(x, w, b)


class Fp8Linear(nn.Module):
    """A linear layer holding float8 weights and their scale as stored; dequantised per call (weight-only)."""

    fmt = "fp8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scale_shape: tuple[int, ...] = (),
                 weight_dtype: torch.dtype = torch.float8_e4m3fn, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=weight_dtype, device=device),
                                   requires_grad=False)
        # Parameters, not buffers: the loader and ComfyUI's memory manager move parameters, and a scale must travel
        # with its weight.
        self.weight_scale = nn.Parameter(torch.empty(scale_shape, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in `dtype`: float32 product first, then one rounding (as dequantise-on-load did)."""
        scale = self.weight_scale.float()
        scale = scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(())
        return (self.weight.float() * scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), b)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={self.weight.dtype}"


FORMATS: dict[str, type[nn.Module]] = {"dense": Linear, "fp8": Fp8Linear}


def make_linear(in_features: int, out_features: int, bias: bool = True, fmt: str = "dense",
                **options) -> nn.Module:
    """The one factory of the DiT's linear layers. `options` are the format's own (e.g. fp8's scale_shape)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown linear format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return FORMATS[fmt](in_features, out_features, bias=bias, **options)


def set_formats(model: nn.Module, formats: Mapping[str, tuple[str, dict]]) -> None:
    """Replace the linear layers named in `formats` ({name: (fmt, options)}) by layers of that format, keeping
    their sizes; done on the `meta` device before loading, so nothing is allocated."""
    for name, (fmt, options) in formats.items():
        old = model.get_submodule(name)
        if not isinstance(old, (nn.Linear, *FORMATS.values())):
            raise TypeError(f"{name} is a {type(old).__name__}, not a linear layer")
        model.set_submodule(name, make_linear(old.in_features, old.out_features, old.bias is not None, fmt,
                                              device="meta", **options))


def linear_formats(model: nn.Module) -> dict[str, int]:
    """How many linear layers of each format the model holds (for logs and tests)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        fmt = getattr(module, "fmt", None)
        if fmt is not None:
            counts[fmt] = counts.get(fmt, 0) + 1
    return counts


def dense_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors with every quantised weight dequantised and its scales dropped: what a dense model of
    the same numbers holds (for exports, LoRA merges and comparisons). Dense tensors are returned as they are."""
    out = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, Fp8Linear):
            w_dtype = dtype or getattr(model, "compute_dtype", torch.float32)
            out[prefix + "weight"] = module.dequantized(w_dtype)
            if module.bias is not None:
                out[prefix + "bias"] = module.bias
            continue
        out.update({prefix + leaf: p for leaf, p in module.named_parameters(recurse=False)})
    return out
