"""The DiT's linear layers: one factory, several weight formats.

Every linear layer of the DiT is made by `make_linear(fmt, ...)`, as ComfyUI's models take an `operations=` argument.
A layer keeps its weight in the format the checkpoint stores it in and computes in the activations' dtype:
- "dense": a floating-point weight (bf16, fp16, fp32), cast at use only if it differs from the input's dtype (so
  streamed or offloaded weights in another dtype still compute in the stated dtype);
- "fp8": float8 (e4m3fn or e5m2) values with a float32 scale (one per tensor, or one per output row); fp8 matmuls on
  GPUs with fp8 tensor cores, else dequantised at use (weight-only) exactly as the checkpoint readers dequantise:
  `(w.float() * scale).to(dtype)`;
- "fp4": NVFP4 (packed e2m1 pairs, e4m3 block scales per 16 values, a float32 tensor scale); NVFP4 matmuls with
  activations quantised per call on GPUs with FP4 tensor cores (Blackwell, kontext.quant.fp4_mm), else dequantised
  at use (weight-only, W4A16).
The model is first built with dense layers on the `meta` device; the loader then swaps in the formats the file holds
(`set_formats`) and hands each layer its tensors as stored. A new format (fp8 matmuls, NVFP4, a LoRA branch) is a new
class here and a name in FORMATS; nothing else in the model changes.
"""
from __future__ import annotations

import logging
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .quant import fp4_mm, fp8, nvfp4
from .quant.fp8 import FP8_DTYPES

log = logging.getLogger(__name__)
__all__ = ["FP8_DTYPES", "FORMATS", "Linear", "Fp8Linear", "Fp4Linear", "make_linear", "set_formats",
           "dense_state_dict", "linear_formats"]


class CastAtUse:
    """Layers whose weights may live elsewhere than their input (offloaded, streamed by a memory manager): each call
    brings the weight to the input's device and dtype (a no-op when it is there already) and applies the functions
    a host registered on it, such as a LoRA delta computed at run time.

    The attribute names are those of ComfyUI's memory manager (ModelPatcher), the host that drives this protocol:
    it offloads layers that have `comfy_cast_weights` and fills `weight_function` / `bias_function`."""

    comfy_cast_weights = False
    lora_branch = None  # a kontext.lora.apply.Branch: low-rank LoRAs added to the output (see add_branch)

    def _init_cast(self) -> None:
        self.weight_function: list = []
        self.bias_function: list = []

    def cast_weight(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # A copy when functions follow: they may work in place, and must never change the stored weight.
        w = w.to(device=x.device, dtype=x.dtype, non_blocking=True, copy=bool(self.weight_function))
        for f in self.weight_function:
            w = f(w)
        return w

    def add_branch(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out + up @ (down @ x) for the layer's low-rank LoRAs, in the input's dtype (rank R: ~R/K of the cost)."""
        b = self.lora_branch
        if b is None:
            return out
        down, up = b.down.to(x.device, x.dtype), b.up.to(x.device, x.dtype)
        return out + F.linear(F.linear(x, down), up)

    def cast_bias(self, b: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        if b is None:
            return None
        b = b.to(device=x.device, dtype=x.dtype, non_blocking=True, copy=bool(self.bias_function))
        for f in self.bias_function:
            b = f(b)
        return b


class Linear(CastAtUse, nn.Linear):
    """A dense linear layer that computes in its input's dtype."""

    fmt = "dense"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_cast()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_branch(x, F.linear(x, self.cast_weight(self.weight, x), self.cast_bias(self.bias, x)))


_logged: set[tuple[str, str]] = set()


def _log_path(fmt: str, path: str, why: str, fallback: bool = False) -> None:
    """Say once per run which compute path a weight format takes (and why), not once per layer and call; a GPU
    that cannot serve the fast path is a warning, never silent."""
    if (fmt, path) not in _logged:
        _logged.add((fmt, path))
        (log.warning if fallback else log.info)("%s linear layers: %s (%s)", fmt, path, why)


class Fp8Linear(CastAtUse, nn.Module):
    """A linear layer holding float8 weights and their scale exactly as stored (see kontext.quant.fp8).

    `full_precision` (ComfyUI's `full_precision_matrix_mult`) keeps the layer on the weight-only path."""

    fmt = "fp8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scale_shape: tuple[int, ...] = (),
                 weight_dtype: torch.dtype = torch.float8_e4m3fn, input_scale: bool = False,
                 full_precision: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.full_precision = full_precision
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=weight_dtype, device=device),
                                   requires_grad=False)
        # Parameters, not buffers: the loader and ComfyUI's memory manager move parameters, and a scale must travel
        # with its weight.
        self.weight_scale = nn.Parameter(torch.empty(scale_shape, device=device), requires_grad=False)
        # A static activation scale some files carry; kept so the layer round-trips to its file, unused by the
        # per-token quantisation of the fp8 matmul (more accurate than one scale for every token).
        self.input_scale = nn.Parameter(torch.empty((), device=device), requires_grad=False) if input_scale else None
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        self._path: str | None = None
        self._init_cast()

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in `dtype`: float32 product first, then one rounding (as dequantise-on-load did)."""
        return fp8.dequantize(self.weight, self.weight_scale, dtype)

    def path(self, x: torch.Tensor) -> str:
        if self._path is None:
            if self.full_precision:
                self._path, why = "weight-only", "the file marks these layers full precision"
            elif not fp8.scaled_mm_supported(x.device):
                self._path, why = "weight-only", f"no fp8 tensor cores on {x.device}"
            elif self.weight.dtype != torch.float8_e4m3fn:
                self._path, why = "weight-only", f"{self.weight.dtype} weights: fp8 matmuls take e4m3"
            elif self.in_features % 16 or self.out_features % 16:
                self._path, why = "weight-only", "sides not multiples of 16"
            else:
                self._path, why = "scaled_mm", "fp8 tensor cores, per-token activation scales"
            _log_path("fp8", self._path, why, fallback=self._path != "scaled_mm" and not self.full_precision)
        return self._path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w8, scale = self.weight.to(x.device, non_blocking=True), self.weight_scale.to(x.device, non_blocking=True)
        if x.is_cuda and not self.weight_function and self.path(x) == "scaled_mm":
            row = scale.float().reshape(1, -1).expand(1, self.out_features)
            return self.add_branch(x, fp8.scaled_mm_linear(x, w8, row.contiguous(), self.cast_bias(self.bias, x)))
        if not x.is_cuda:
            _log_path("fp8", "weight-only", f"no fp8 matmul on {x.device}")
        # A run-time weight function (a LoRA on a quantised layer) sees the dequantised weight: nothing re-quantised.
        w = self.cast_weight(fp8.dequantize(w8, scale, x.dtype), x)
        return self.add_branch(x, F.linear(x, w, self.cast_bias(self.bias, x)))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={self.weight.dtype}"


class Fp4Linear(CastAtUse, nn.Module):
    """A linear layer holding NVFP4 weights as stored (kontext.quant.nvfp4): packed e2m1 pairs [out, in/2], e4m3
    block scales in cuBLAS's tiled layout, a float32 tensor scale. On FP4 tensor cores (compute capability >= 10)
    an NVFP4 matmul with the activations quantised per call (kontext.quant.fp4_mm); elsewhere, for layers marked
    `full_precision` and under a run-time weight function, weight-only (W4A16): dequantised to the compute dtype
    at use. The path taken is logged once."""

    fmt = "fp4"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_scale: bool = False,
                 full_precision: bool = False, device=None):
        super().__init__()
        if in_features % nvfp4.BLOCK:
            raise ValueError(f"NVFP4 needs in_features divisible by {nvfp4.BLOCK}, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.full_precision = full_precision
        rows, cols = nvfp4.scale_shape(out_features, in_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(rows, cols, dtype=torch.float8_e4m3fn, device=device),
                                         requires_grad=False)
        self.weight_scale_2 = nn.Parameter(torch.empty((), device=device), requires_grad=False)
        # Kept so the layer round-trips to its file; the NVFP4 matmul computes a scale per call instead.
        self.input_scale = nn.Parameter(torch.empty((), device=device), requires_grad=False) if input_scale else None
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        self._init_cast()

    def dequantized(self, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
        device = device or self.weight.device
        return nvfp4.dequantize(self.weight.to(device), self.weight_scale.to(device), self.weight_scale_2.to(device),
                                (self.out_features, self.in_features), dtype)

    def path(self, x: torch.Tensor) -> fp4_mm.Choice:
        """This call's path (a run-time weight function may come and go between calls), logged once per kind."""
        sides_ok = self.in_features % fp4_mm.K_ALIGN == 0 and self.out_features % fp4_mm.N_ALIGN == 0
        choice = fp4_mm.choose_path(fp4_mm.capability(x.device), self.full_precision, bool(self.weight_function),
                                    fp4_mm.torch_api(), sides_ok, fp4_mm.kernel_failed())
        _log_path("fp4", choice.label, choice.why, fallback=choice.fallback)
        return choice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.path(x)
        fast = choice.path != fp4_mm.WEIGHT_ONLY and x.numel() > 0  # an empty input has no tensor scale
        out = self._nvfp4_matmul(x, choice.path) if fast else None
        if out is None:
            w = self.cast_weight(self.dequantized(x.dtype, x.device), x)
            out = F.linear(x, w, self.cast_bias(self.bias, x))
        return self.add_branch(x, out)

    def _nvfp4_matmul(self, x: torch.Tensor, api: str) -> torch.Tensor | None:
        """The NVFP4 matmul, or None when the kernel refuses (a driver, cuBLAS or torch build without it): then
        one warning, and every fp4 layer computes weight-only from this call on."""
        weight = tuple(t.to(x.device, non_blocking=True) for t in (self.weight, self.weight_scale,
                                                                   self.weight_scale_2))
        try:
            return fp4_mm.fp4_linear(x, weight, self.cast_bias(self.bias, x), api)
        except torch.OutOfMemoryError:  # not the kernel's fault, and weight-only would need more memory
            raise
        except (RuntimeError, TypeError, ValueError) as exc:  # NotImplementedError is a RuntimeError
            fp4_mm.mark_failed(f"{type(exc).__name__}: {exc}")
            _log_path("fp4", fp4_mm.FAILED_LABEL, f"the NVFP4 matmul failed ({type(exc).__name__}: {exc})",
                      fallback=True)
            return None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=nvfp4"


FORMATS: dict[str, type[nn.Module]] = {"dense": Linear, "fp8": Fp8Linear, "fp4": Fp4Linear}


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
        if isinstance(module, (Fp8Linear, Fp4Linear)):
            w_dtype = dtype or getattr(model, "compute_dtype", torch.float32)
            out[prefix + "weight"] = module.dequantized(w_dtype)
            if module.bias is not None:
                out[prefix + "bias"] = module.bias
            continue
        out.update({prefix + leaf: p for leaf, p in module.named_parameters(recurse=False)})
    return out
