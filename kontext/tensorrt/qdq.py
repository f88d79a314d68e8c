"""Quantised weights as explicit ONNX DequantizeLinear nodes, for the export.

At export time each fp8 / fp4 linear layer of the DiT is stood in for by a layer whose weight goes through one of the
two custom ops below; the exporter translates each into DequantizeLinear nodes on the stored weight, the pattern
TensorRT's explicit quantisation looks for ("an IDequantizeLayer between the weights and the linear operator"):
- fp8: DequantizeLinear(float8 weight [N, K], float32 scale (one, or one per output row on axis 0));
- NVFP4: DequantizeLinear(e4m3 block scales [N, K/16], float32 tensor scale) -> float32 block scales, then
  DequantizeLinear(FLOAT4E2M1 weight [N, K], those, axis=1, block_size=16), NVFP4's two-level scaling.
The stored values reach the graph exactly: fp8 bytes as they are; NVFP4 nibbles swapped into ONNX's order (first
element in the low nibble; ComfyUI's files put it in the high one) and the block scales unswizzled from cuBLAS's
tiles to [N, K/16]. The dequantised weight is float32 (one rounding, as kontext.ops dequantises) and then cast to the
compute dtype, so the graph computes what the PyTorch model computes. Activations are not quantised (weight-only
Q/DQ): the files carry no activation scales fit for every token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import Fp4Linear, Fp8Linear
from ..quant import nvfp4


@torch.library.custom_op("kontext::dequantize_fp8", mutates_args=())
def dequantize_fp8(w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8 [N, K] and a float32 scale (0-dim or [N]) -> float32 [N, K]."""
    s = scale.float().reshape(-1, 1) if scale.numel() > 1 else scale.float().reshape(())
    return w8.float() * s


@dequantize_fp8.register_fake
def _(w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return w8.new_empty(w8.shape, dtype=torch.float32)


@torch.library.custom_op("kontext::dequantize_nvfp4", mutates_args=())
def dequantize_nvfp4(w4: torch.Tensor, block_scales: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """float4_e2m1fn_x2 [N, K/2] (ONNX nibble order), e4m3 [N, K/16], float32 0-dim -> float32 [N, K]."""
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


def translations(opset: int) -> dict:
    """The exporter's translation of the two ops into DequantizeLinear nodes of `opset`."""
    from onnxscript import values

    op = values.Opset("", opset)

    def fp8(w8, scale):
        return op.DequantizeLinear(w8, scale, axis=0)

    def fp4(w4, block_scales, tensor_scale):
        scales = op.DequantizeLinear(block_scales, tensor_scale)
        return op.DequantizeLinear(w4, scales, axis=1, block_size=nvfp4.BLOCK)

    return {torch.ops.kontext.dequantize_fp8.default: fp8, torch.ops.kontext.dequantize_nvfp4.default: fp4}


class QdqLinear(nn.Module):
    """A quantised linear layer's export stand-in: the same stored values, its weight through a dequantise op."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.fmt = layer.fmt
        self.lora_branch = layer.lora_branch
        self.bias = layer.bias
        if isinstance(layer, Fp8Linear):
            self.weight, self.weight_scale = layer.weight, layer.weight_scale
        else:
            n, k = layer.out_features, layer.in_features
            swapped = swap_nibbles(layer.weight.detach())
            self.weight = nn.Parameter(swapped.view(torch.float4_e2m1fn_x2), requires_grad=False)
            scales = nvfp4.unswizzle_scales(layer.weight_scale.detach(), n, k // nvfp4.BLOCK)
            self.weight_scale = nn.Parameter(scales.contiguous(), requires_grad=False)
            self.weight_scale_2 = nn.Parameter(layer.weight_scale_2.detach().float().reshape(()),
                                               requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        if self.fmt == "fp8":
            return dequantize_fp8(self.weight, self.weight_scale)
        return dequantize_nvfp4(self.weight, self.weight_scale, self.weight_scale_2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = F.linear(x, self.dequantized().to(x.dtype), bias)
        b = self.lora_branch
        return out if b is None else out + F.linear(F.linear(x, b.down.to(x.dtype)), b.up.to(x.dtype))


def quantised_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (Fp8Linear, Fp4Linear))]
