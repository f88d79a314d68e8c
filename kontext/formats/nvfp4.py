"""NVFP4 weights (kontext.quant.nvfp4): packed e2m1 pairs [out, in/2], e4m3 block scales per 16 values in cuBLAS's
tiled layout, a float32 tensor scale. NVFP4 matmuls with activations quantised per call on GPUs with FP4 tensor
cores (Blackwell, kontext.quant.fp4_mm), else dequantised at use (weight-only, W4A16)."""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..quant import fp4_mm, nvfp4
from .base import ParamSpec, Shape, StoredQuant, StoredSource, StoredTensors, WeightFormat, first, meta
from .layer import CastAtUse, log_path


class Fp4Linear(CastAtUse, nn.Module):
    """A linear layer holding NVFP4 weights as stored. On FP4 tensor cores (compute capability >= 10) an NVFP4
    matmul with the activations quantised per call (kontext.quant.fp4_mm); elsewhere, for layers marked
    `full_precision` and under a run-time weight function, weight-only (W4A16): dequantised to the compute dtype
    at use. The path taken is logged once."""

    weight: nn.Parameter  # the tensors of NVFP4.params, made in __init__
    weight_scale: nn.Parameter
    weight_scale_2: nn.Parameter

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_scale: bool = False,
                 full_precision: bool = False, device=None):
        super().__init__()
        if in_features % nvfp4.BLOCK:
            raise ValueError(f"NVFP4 needs in_features divisible by {nvfp4.BLOCK}, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.full_precision = full_precision
        for name, (shape, dtype) in NVFP4.params(out_features, in_features).items():
            setattr(self, name, nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False))
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
        log_path(self.fmt, choice.label, choice.why, fallback=choice.fallback)
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
        weight = (self.weight.to(x.device, non_blocking=True), self.weight_scale.to(x.device, non_blocking=True),
                  self.weight_scale_2.to(x.device, non_blocking=True))
        try:
            return fp4_mm.fp4_linear(x, weight, self.cast_bias(self.bias, x), api)
        except torch.OutOfMemoryError:  # not the kernel's fault, and weight-only would need more memory
            raise
        except (RuntimeError, TypeError, ValueError) as exc:  # NotImplementedError is a RuntimeError
            fp4_mm.mark_failed(f"{type(exc).__name__}: {exc}")
            log_path(self.fmt, fp4_mm.FAILED_LABEL, f"the NVFP4 matmul failed ({type(exc).__name__}: {exc})",
                     fallback=True)
            return None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=nvfp4"


@torch.library.custom_op("kontext::dequantize_nvfp4", mutates_args=())
def dequantize_nvfp4(w4: torch.Tensor, block_scales: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """The export op: float4_e2m1fn_x2 [N, K/2] (ONNX nibble order), e4m3 [N, K/16], float32 0-dim -> float32
    [N, K]."""
    high_first = swap_nibbles(w4.view(torch.uint8))
    n, k = w4.shape[0], w4.shape[1] * 2
    values = nvfp4.decode_e2m1(nvfp4.unpack_nibbles(high_first)).view(n, k // nvfp4.BLOCK, nvfp4.BLOCK)
    return (values * block_scales.float()[..., None] * tensor_scale.float()).view(n, k)


@dequantize_nvfp4.register_fake
def _(w4: torch.Tensor, block_scales: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    return w4.new_empty((w4.shape[0], w4.shape[1] * 2), dtype=torch.float32)


def swap_nibbles(b: torch.Tensor) -> torch.Tensor:
    """uint8 with the pair order flipped: high-nibble-first <-> low-nibble-first."""
    return (b << 4) | (b >> 4)


class Nvfp4Format(WeightFormat):
    name = "fp4"
    bits = 4
    comfy_name = "nvfp4"
    comfy_names = {"nvfp4": torch.uint8}
    export_opset = 23  # FLOAT4E2M1 DequantizeLinear
    linear = Fp4Linear

    def params(self, out_features: int, in_features: int) -> dict[str, ParamSpec]:
        return {"weight": ((out_features, in_features // 2), torch.uint8),
                "weight_scale": (nvfp4.scale_shape(out_features, in_features), torch.float8_e4m3fn),
                "weight_scale_2": ((), torch.float32)}

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        q = nvfp4.quantize(w)
        return {"weight": q.packed, "weight_scale": q.block_scales, "weight_scale_2": q.tensor_scale}

    def dequantize(self, tensors: Mapping[str, torch.Tensor], shape: tuple[int, int],
                   dtype: torch.dtype) -> torch.Tensor:
        return nvfp4.dequantize(tensors["weight"], tensors["weight_scale"], tensors["weight_scale_2"], shape, dtype)

    # ---- files
    def describe(self, ckpt: StoredTensors, stem: str, comfy_name: str, full_precision: bool) -> StoredQuant:
        key = f"{stem}.weight"
        block, tensor = first(ckpt, stem, ("weight_scale",)), first(ckpt, stem, ("weight_scale_2",))
        for name, found in (("weight_scale", block), ("weight_scale_2", tensor)):
            if found is None:
                raise CheckpointError(ckpt.path, f"layer '{stem}' (nvfp4) has no '{name}'",
                                      "NVFP4 block and tensor scales")
        shape = ckpt.infos[key].shape
        if len(shape) != 2:
            raise CheckpointError(ckpt.path, f"layer '{stem}' (nvfp4): weight of shape {list(shape)}", "[N, K/2]")
        assert block is not None and tensor is not None
        try:
            nvfp4.check_shapes(meta(ckpt, key), meta(ckpt, block), meta(ckpt, tensor), shape[0], 2 * shape[1])
        except ValueError as exc:
            raise CheckpointError(ckpt.path, f"layer '{stem}' (nvfp4): {exc}") from None
        return StoredQuant(self, key, block, tensor, first(ckpt, stem, ("input_scale",)), full_precision)

    def stored_layer(self, ckpt: StoredTensors, q: StoredQuant) -> tuple[dict, dict[str, StoredSource]]:
        return {}, {"weight_scale": (q.scale, "raw"), "weight_scale_2": (q.scale_2, "scale")}

    def logical_shape(self, stored: Shape) -> Shape:
        return (stored[0], 2 * stored[1])  # two values a byte along K

    def read(self, ckpt: StoredTensors, q: StoredQuant) -> torch.Tensor:
        assert q.scale is not None and q.scale_2 is not None
        packed = ckpt.raw(q.weight)
        return nvfp4.dequantize(packed, ckpt.raw(q.scale), ckpt.raw(q.scale_2).float().reshape(()),
                                (packed.shape[0], 2 * packed.shape[1]), torch.float32)

    # ---- export: DequantizeLinear(e4m3 block scales [N, K/16], float32 tensor scale) -> float32 block scales,
    # then DequantizeLinear(FLOAT4E2M1 weight [N, K], those, axis=1, block_size=16). The nibbles are swapped into
    # ONNX's order (first element in the low nibble) and the block scales unswizzled from cuBLAS's tiles.
    def export_tensors(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        assert isinstance(layer, Fp4Linear)
        n, k = layer.out_features, layer.in_features
        return {"weight": swap_nibbles(layer.weight.detach()).view(torch.float4_e2m1fn_x2),
                "weight_scale": nvfp4.unswizzle_scales(layer.weight_scale.detach(), n, k // nvfp4.BLOCK).contiguous(),
                "weight_scale_2": layer.weight_scale_2.detach().float().reshape(())}

    def export_dequantize(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return dequantize_nvfp4(tensors["weight"], tensors["weight_scale"], tensors["weight_scale_2"])


NVFP4 = Nvfp4Format()
Fp4Linear.format = NVFP4
