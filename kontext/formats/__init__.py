"""Stored weight formats: one object per format, the only place that knows what a format is.

A format (a `WeightFormat`, kontext/formats/base.py) owns its layer's tensor names and shapes, quantising a dense
weight and dequantising, its linear layer class and that class's compute paths, its names in ComfyUI's
`comfy_quant` metadata, how a file's layer in it is checked and read, its ONNX export step and its resident bytes.
The loader, the `quantize` writer, the bench, the TensorRT export and the nodes ask the format object; none of them
compares format names.

Formats: DENSE (bf16/fp16/fp32, dense.py), FP8 (float8 e4m3fn/e5m2 with per-row or per-tensor scales, fp8.py),
NVFP4 (nvfp4.py).

Adding a format:
1. a module here with the layer class (a `CastAtUse` nn.Module holding the stored tensors as parameters, with a
   `forward` that picks its compute path for the device) and a `WeightFormat` subclass implementing `params`,
   `quantize`, `dequantize`, `describe` / `stored_layer` / `read` / `logical_shape` (files), `export_tensors` /
   `export_dequantize` (ONNX; its custom op translated in kontext.tensorrt.qdq), with `name` (the precision name
   users give), `bits`, `comfy_name`/`comfy_names` and `linear`; then `Layer.format = THE_FORMAT`;
2. one line in FORMATS below.
"""
from __future__ import annotations

from .base import StoredQuant, WeightFormat
from .dense import DENSE, DenseFormat, Linear
from .fp8 import FP8, Fp8Format, Fp8Linear
from .nvfp4 import NVFP4, Fp4Linear, Nvfp4Format

# The formats by their precision name, dense first, then from the widest to the narrowest.
FORMATS: dict[str, WeightFormat] = {f.name: f for f in (DENSE, FP8, NVFP4)}
QUANTIZED: dict[str, WeightFormat] = {name: f for name, f in FORMATS.items() if f.quantized}
# `comfy_quant` format name -> the format reading it.
COMFY_NAMES: dict[str, WeightFormat] = {n: f for f in FORMATS.values() for n in f.comfy_names}


def get_format(name: str) -> WeightFormat:
    """The format called `name` ("dense", "fp8", "fp4"); KeyError for another name."""
    return FORMATS[name]


def narrowest(formats) -> WeightFormat | None:
    """The format with the fewest bits per weight among `formats` (a file mixing fp8 and NVFP4 is an fp4 file)."""
    return min(formats, key=lambda f: f.bits, default=None)


def layer_format(module) -> WeightFormat | None:
    """The format of one of our linear layers; None for any other module."""
    return getattr(module, "format", None) if isinstance(module, tuple(f.linear for f in FORMATS.values())) \
        else None


__all__ = ["COMFY_NAMES", "DENSE", "FORMATS", "FP8", "NVFP4", "QUANTIZED", "DenseFormat", "Fp4Linear", "Fp8Format",
           "Fp8Linear", "Linear", "Nvfp4Format", "StoredQuant", "WeightFormat", "get_format", "layer_format",
           "narrowest"]
