"""Quantised weights as explicit ONNX DequantizeLinear nodes, for the export.

At export time each fp8 / fp4 linear layer of the DiT is stood in for by a layer whose weight goes through its
format's custom op (kontext.formats: `WeightFormat.export_tensors` and `export_dequantize`); the exporter
translates each into DequantizeLinear nodes on the stored weight (`translations` below), the pattern TensorRT's
explicit quantisation looks for ("an IDequantizeLayer between the weights and the linear operator"):
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

from ..formats import layer_format
from ..formats.fp8 import dequantize_fp8
from ..formats.nvfp4 import dequantize_nvfp4, swap_nibbles
from ..quant import nvfp4

__all__ = ["QdqLinear", "dequantize_fp8", "dequantize_nvfp4", "quantised_layers", "swap_nibbles", "translations"]


def translations(opset: int) -> dict:
    """The exporter's translation of the formats' dequantise ops into DequantizeLinear nodes of `opset`."""
    from onnxscript import values

    op = values.Opset("", opset)

    def fp8(w8, scale):
        return op.DequantizeLinear(w8, scale, axis=0)

    def fp4(w4, block_scales, tensor_scale):
        scales = op.DequantizeLinear(block_scales, tensor_scale)
        return op.DequantizeLinear(w4, scales, axis=1, block_size=nvfp4.BLOCK)

    return {torch.ops.kontext.dequantize_fp8.default: fp8, torch.ops.kontext.dequantize_nvfp4.default: fp4}


class QdqLinear(nn.Module):
    """A quantised linear layer's export stand-in: the same stored values, in the layout its format's export step
    reads (`WeightFormat.export_tensors`), its weight through the format's dequantise op."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        fmt = layer_format(layer)
        assert fmt is not None and fmt.quantized, f"{type(layer).__name__} is not a quantised linear layer"
        self.format = fmt
        self.lora_branch = layer.lora_branch
        self.bias = layer.bias
        self._leaves = []
        for leaf, t in fmt.export_tensors(layer).items():
            setattr(self, leaf, t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False))
            self._leaves.append(leaf)

    def dequantized(self) -> torch.Tensor:
        return self.format.export_dequantize({leaf: getattr(self, leaf) for leaf in self._leaves})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = F.linear(x, self.dequantized().to(x.dtype), bias)
        b = self.lora_branch
        return out if b is None else out + F.linear(F.linear(x, b.down.to(x.dtype)), b.up.to(x.dtype))


def quantised_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if (f := layer_format(m)) is not None and f.quantized]
