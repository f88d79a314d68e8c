"""fp8 weights: float8 values (e4m3fn, or e5m2 in some files) with a float32 scale, one per output row (quantised on
load: a row's outliers then cost only that row's precision) or one per tensor (ComfyUI's files). The codec and the
matmul paths are kontext.quant.fp8's."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..quant import fp8
from .base import ParamSpec, Shape, StoredQuant, StoredSource, StoredTensors, WeightFormat, first
from .layer import CastAtUse, log_path

COMFY_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


class Fp8Linear(CastAtUse, nn.Module):
    """A linear layer holding float8 weights and their scale exactly as stored. fp8 matmuls on GPUs with fp8 tensor
    cores, else dequantised at use (weight-only) exactly as the checkpoint readers dequantise:
    `(w.float() * scale).to(dtype)`. `full_precision` (ComfyUI's `full_precision_matrix_mult`) keeps the layer on
    the weight-only path."""

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
            log_path(self.fmt, self._path, why, fallback=self._path != "scaled_mm" and not self.full_precision)
        return self._path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w8, scale = self.weight.to(x.device, non_blocking=True), self.weight_scale.to(x.device, non_blocking=True)
        if x.is_cuda and not self.weight_function and self.path(x) == "scaled_mm":
            row = scale.float().reshape(1, -1).expand(1, self.out_features)
            return self.add_branch(x, fp8.scaled_mm_linear(x, w8, row.contiguous(), self.cast_bias(self.bias, x)))
        if not x.is_cuda:
            log_path(self.fmt, "weight-only", f"no fp8 matmul on {x.device}")
        # A run-time weight function (a LoRA on a quantised layer) sees the dequantised weight: nothing re-quantised.
        w = self.cast_weight(fp8.dequantize(w8, scale, x.dtype), x)
        return self.add_branch(x, F.linear(x, w, self.cast_bias(self.bias, x)))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={self.weight.dtype}"


@torch.library.custom_op("kontext::dequantize_fp8", mutates_args=())
def dequantize_fp8(w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The export op: float8 [N, K] and a float32 scale (0-dim or [N]) -> float32 [N, K]."""
    s = scale.float().reshape(-1, 1) if scale.numel() > 1 else scale.float().reshape(())
    return w8.float() * s


@dequantize_fp8.register_fake
def _(w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return w8.new_empty(w8.shape, dtype=torch.float32)


@dataclass(frozen=True, eq=True)
class Fp8Format(WeightFormat):
    """`per_row`: one scale per output row (quantise on load), else one per tensor (ComfyUI's mixed files)."""

    per_row: bool = True
    name = "fp8"
    bits = 8
    comfy_name = "float8_e4m3fn"
    comfy_names = COMFY_DTYPES
    linear = Fp8Linear

    def params(self, out_features: int, in_features: int) -> dict[str, ParamSpec]:
        return {"weight": ((out_features, in_features), fp8.E4M3),
                "weight_scale": ((out_features,) if self.per_row else (), torch.float32)}

    def for_file(self) -> "Fp8Format":
        return Fp8Format(per_row=False)

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        w8, scale = fp8.quantize(w, per_row=self.per_row)
        return {"weight": w8, "weight_scale": scale}

    def dequantize(self, tensors: Mapping[str, torch.Tensor], shape: tuple[int, int],
                   dtype: torch.dtype) -> torch.Tensor:
        return fp8.dequantize(tensors["weight"], tensors["weight_scale"], dtype)

    def layer_options(self, out_features: int) -> dict:
        return {"scale_shape": (out_features,) if self.per_row else ()}

    # ---- files
    def unlabelled(self, ckpt: StoredTensors, key: str) -> bool:
        """A float8 weight without a `comfy_quant` description: ComfyUI's fp8_scaled layout (or no scale at all)."""
        return ckpt.dtype(key) in fp8.FP8_DTYPES

    def describe_unlabelled(self, ckpt: StoredTensors, key: str, full_precision: bool) -> StoredQuant:
        stem = key[: -len(".weight")]
        scale = first(ckpt, stem, ("scale_weight", "weight_scale"))
        if scale is not None:
            n, shape = math.prod(ckpt.infos[scale].shape), ckpt.infos[key].shape
            if n != 1 and (len(shape) != 2 or n != shape[0]):
                raise CheckpointError(ckpt.path, f"scale '{scale}' of shape {list(ckpt.infos[scale].shape)} does "
                                                 f"not fit weight '{key}' of shape {list(shape)}",
                                      "one scale, or one per row")
        return StoredQuant(self, key, scale, input_scale=first(ckpt, stem, ("scale_input", "input_scale")),
                           full_precision=full_precision)

    def describe(self, ckpt: StoredTensors, stem: str, comfy_name: str, full_precision: bool) -> StoredQuant:
        key, stored = f"{stem}.weight", ckpt.dtype(f"{stem}.weight")
        if stored != COMFY_DTYPES[comfy_name]:
            raise CheckpointError(ckpt.path, f"layer '{stem}' says {comfy_name} but its weight is stored as {stored}")
        scale = first(ckpt, stem, ("weight_scale",))
        if scale is None:
            raise CheckpointError(ckpt.path, f"layer '{stem}' ({comfy_name}) has no 'weight_scale'", "its fp8 scale")
        if math.prod(ckpt.infos[scale].shape) != 1:
            raise CheckpointError(ckpt.path, f"layer '{stem}': weight_scale of shape "
                                             f"{list(ckpt.infos[scale].shape)}", "one per-tensor scale")
        return StoredQuant(self, key, scale, input_scale=first(ckpt, stem, ("input_scale",)),
                           full_precision=full_precision)

    def stored_layer(self, ckpt: StoredTensors, q: StoredQuant) -> tuple[dict, dict[str, StoredSource]]:
        n = math.prod(ckpt.infos[q.scale].shape) if q.scale else 1
        options = {"scale_shape": () if n == 1 else (n,), "weight_dtype": ckpt.dtype(q.weight)}
        return options, {"weight_scale": (q.scale, "scale")}  # no key: a unit scale the file leaves implicit

    def logical_shape(self, stored: Shape) -> Shape:
        return stored

    def read(self, ckpt: StoredTensors, q: StoredQuant) -> torch.Tensor:
        scale = ckpt.raw(q.scale) if q.scale else torch.ones(())
        return fp8.dequantize(ckpt.raw(q.weight), scale, torch.float32)

    # ---- export: DequantizeLinear(float8 weight [N, K], float32 scale (one, or one per output row on axis 0))
    def export_tensors(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        assert isinstance(layer, Fp8Linear)
        return {"weight": layer.weight, "weight_scale": layer.weight_scale}

    def export_dequantize(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return dequantize_fp8(tensors["weight"], tensors["weight_scale"])


FP8 = Fp8Format()
Fp8Linear.format = FP8
