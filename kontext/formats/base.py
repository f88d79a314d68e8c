"""The interface every stored weight format implements, and the description of one stored quantised layer."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Protocol

import torch
from torch import nn

Shape = tuple[int, ...]
# One layer parameter as stored: (shape, dtype); dtype None means the model's compute dtype (dense weights).
ParamSpec = tuple[Shape, "torch.dtype | None"]
# Where a layer parameter comes from in a file: (tensor key or None for an implicit unit scale, how it is read:
# "raw" exactly as stored, "scale" a float32 scalar or one per row).
StoredSource = tuple["str | None", str]


class StoredTensors(Protocol):
    """What a format reads off a checkpoint (kontext.weights.Checkpoint is one): the header, and single tensors."""

    @property
    def path(self) -> Path: ...

    @property
    def infos(self) -> Mapping[str, Any]: ...  # key -> its header entry (.dtype, .shape)

    @property
    def metadata(self) -> Mapping[str, str]: ...

    def raw(self, key: str) -> torch.Tensor: ...

    def dtype(self, key: str) -> torch.dtype: ...


@dataclass(frozen=True)
class StoredQuant:
    """One quantised linear weight as stored: its format and the keys of its tensors."""

    format: "WeightFormat"
    weight: str
    scale: str | None  # fp8: per tensor or per row (None: 1); NVFP4: the e4m3 block scales (tiled)
    scale_2: str | None = None  # NVFP4: the float32 tensor scale
    input_scale: str | None = None
    full_precision: bool = False


class WeightFormat(ABC):
    """One way a linear weight is stored in memory and in files. A format knows its layer's tensors (names, shapes,
    dtypes), how to make them from a dense weight and back, the layer class that computes with them, its names in
    ComfyUI's files, how a file's layer of this format is checked and read, its ONNX export step and its bytes."""

    name: ClassVar[str]  # the precision name users give ("dense" for full-precision weights)
    quantized: ClassVar[bool] = True
    bits: ClassVar[int]  # bits per weight value; the fewest wins when a file mixes formats
    comfy_name: ClassVar[str | None] = None  # the `comfy_quant` format written for it
    comfy_names: ClassVar[Mapping[str, torch.dtype]] = {}  # the `comfy_quant` formats read as it (stored dtype)
    export_opset: ClassVar[int | None] = None  # the ONNX opset its export step needs, if above the default
    linear: ClassVar[type[nn.Module]]  # the layer class that holds and computes with its tensors

    def __repr__(self) -> str:
        return f"<weight format {self.name}>"

    # ---- a layer's tensors
    @abstractmethod
    def params(self, out_features: int, in_features: int) -> dict[str, ParamSpec]:
        """The weight's tensors (the bias excepted) by parameter name: {name: (shape, dtype)}."""

    def for_file(self) -> "WeightFormat":
        """The variant written into ComfyUI's mixed-precision files (fp8 has one scale per tensor there)."""
        return self

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """A dense weight [out, in] -> the layer's tensors, by this format's recipe (parameter name -> tensor)."""
        raise NotImplementedError(f"{self.name} weights are not quantised")

    def dequantize(self, tensors: Mapping[str, torch.Tensor], shape: tuple[int, int],
                   dtype: torch.dtype) -> torch.Tensor:
        """The layer's tensors -> the dense weight [out, in] in `dtype`."""
        return tensors["weight"].to(dtype)

    def layer_options(self, out_features: int) -> dict:
        """The layer's options when a dense weight is quantised on load (see `quantize`)."""
        return {}

    def resident_bytes(self, layer: nn.Module, dtype: torch.dtype) -> int:
        """Bytes the layer holds when the model computes in `dtype`: stored tensors at their own size, the bias
        (and a dense weight) in `dtype`."""
        total = 0
        for leaf, p in layer.named_parameters(recurse=False):
            own = self.quantized and leaf != "bias"
            total += p.numel() * (p.element_size() if own else dtype.itemsize)
        return total

    # ---- files
    def logical_shape(self, stored: Shape) -> Shape:
        """The dense weight's shape for a stored weight of shape `stored`."""
        return stored

    def unlabelled(self, ckpt: StoredTensors, key: str) -> bool:
        """Whether weight `key`, which no `comfy_quant` description names, is stored in this format."""
        return False

    def describe_unlabelled(self, ckpt: StoredTensors, key: str, full_precision: bool) -> StoredQuant:
        """Such a weight (see `unlabelled`), checked from the header alone."""
        raise NotImplementedError

    def describe(self, ckpt: StoredTensors, stem: str, comfy_name: str, full_precision: bool) -> StoredQuant:
        """Layer `stem` of a ComfyUI mixed file, described as `comfy_name`, checked from the header alone."""
        raise NotImplementedError

    def stored_layer(self, ckpt: StoredTensors, q: StoredQuant) -> tuple[dict, dict[str, StoredSource]]:
        """(layer options, {parameter: source}) for keeping a stored layer exactly as the file holds it."""
        raise NotImplementedError

    def read(self, ckpt: StoredTensors, q: StoredQuant) -> torch.Tensor:
        """The stored weight as float32, as the file's own reader would compute it."""
        raise NotImplementedError

    # ---- export
    def export_tensors(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        """The layer's tensors in the layout its ONNX dequantise step reads (see kontext.tensorrt.qdq)."""
        raise NotImplementedError

    def export_dequantize(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The float32 weight from `export_tensors`' tensors, through this format's export op (a torch custom op
        the ONNX exporter translates into DequantizeLinear nodes)."""
        raise NotImplementedError


def first(ckpt: StoredTensors, stem: str, names: tuple[str, ...]) -> str | None:
    """The first of `stem`.`names` the file holds."""
    return next((f"{stem}.{n}" for n in names if f"{stem}.{n}" in ckpt.infos), None)


def meta(ckpt: StoredTensors, key: str) -> torch.Tensor:
    """A meta tensor with the stored shape and dtype, so shape checks need no data."""
    return torch.empty(ckpt.infos[key].shape, dtype=ckpt.dtype(key), device="meta")
