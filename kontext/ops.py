"""The DiT's linear layers: one factory, one layer class per weight format (kontext.formats).

Every linear layer of the DiT is made by `make_linear(..., fmt=...)`, as ComfyUI's models take an `operations=`
argument. A layer keeps its weight in the format the checkpoint stores it in and computes in the activations' dtype;
its format object (kontext.formats: DENSE, FP8, NVFP4) says which class that is and how it picks a compute path.
The model is first built with dense layers on the `meta` device; the loader then swaps in the formats the file holds
(`set_formats`) and hands each layer its tensors as stored. A new format is a new class in kontext.formats and one
line in its registry; nothing else in the model changes.
"""
from __future__ import annotations

import logging
from typing import Mapping

import torch
from torch import nn

from .formats import DENSE, FORMATS as _BY_NAME, Fp4Linear, Fp8Linear, Linear, WeightFormat, layer_format
from .formats.layer import CastAtUse
from .quant.fp8 import FP8_DTYPES

log = logging.getLogger(__name__)
__all__ = ["FP8_DTYPES", "FORMATS", "CastAtUse", "Linear", "Fp8Linear", "Fp4Linear", "make_linear", "set_formats",
           "dense_state_dict", "linear_formats"]

# Layer class by format name, for messages and tests; the formats themselves are kontext.formats.FORMATS.
FORMATS: dict[str, type[nn.Module]] = {name: f.linear for name, f in _BY_NAME.items()}
# {layer name: (format, the layer's options)}, what `set_formats` swaps in.
LayerFormats = Mapping[str, tuple[WeightFormat, dict]]


def make_linear(in_features: int, out_features: int, bias: bool = True, fmt: WeightFormat = DENSE,
                **options) -> nn.Module:
    """The one factory of the DiT's linear layers. `options` are the format's own (e.g. fp8's scale_shape)."""
    if not isinstance(fmt, WeightFormat):
        raise TypeError(f"expected a kontext.formats weight format, got {fmt!r}")
    return fmt.linear(in_features, out_features, bias=bias, **options)


def set_formats(model: nn.Module, formats: LayerFormats) -> None:
    """Replace the linear layers named in `formats` ({name: (format, options)}) by layers of that format, keeping
    their sizes; done on the `meta` device before loading, so nothing is allocated."""
    for name, (fmt, options) in formats.items():
        old = model.get_submodule(name)
        if not isinstance(old, (nn.Linear, *FORMATS.values())):
            raise TypeError(f"{name} is a {type(old).__name__}, not a linear layer")
        model.set_submodule(name, make_linear(old.in_features, old.out_features, old.bias is not None, fmt,
                                              device="meta", **options))


def linear_formats(model: nn.Module) -> dict[str, int]:
    """How many linear layers of each format the model holds, by format name (for logs and tests)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        fmt = layer_format(module)
        if fmt is not None:
            counts[fmt.name] = counts.get(fmt.name, 0) + 1
    return counts


def dense_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors with every quantised weight dequantised and its scales dropped: what a dense model of
    the same numbers holds (for exports, LoRA merges and comparisons). Dense tensors are returned as they are."""
    out = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        fmt = layer_format(module)
        if fmt is not None and fmt.quantized:
            w_dtype = dtype or getattr(model, "compute_dtype", torch.float32)
            out[prefix + "weight"] = module.dequantized(w_dtype)
            if module.bias is not None:
                out[prefix + "bias"] = module.bias
            continue
        out.update({prefix + leaf: p for leaf, p in module.named_parameters(recurse=False)})
    return out
