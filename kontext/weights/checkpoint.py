"""Read-only, validated, streaming access to safetensors checkpoints (one file or a folder of shards).

We parse the safetensors header ourselves so that a damaged or foreign file fails with a message naming the file and
the problem, before a single tensor is read. Tensors are then copied out of a memory map one at a time and the map's
pages are released right after, so loading a 24 GB file needs about one tensor of extra RAM, not the file's size.
Only safetensors are ever read: pickle-based formats are refused by name, never opened.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from ..formats.stored import describe_quantized

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
MAX_HEADER = 256 * 1024 * 1024  # a real header of 1000s of tensors is < 1 MB; anything huge is not safetensors

# Auxiliary tensors of ComfyUI's fp8 "scaled" layouts: they describe a weight rather than being one.
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
AUX_SUFFIXES = SCALE_SUFFIXES + (".scale_input", ".input_scale", ".comfy_quant", ".weight_scale_2")
AUX_KEYS = ("scaled_fp8",)  # the marker, bare or under the model's prefix ("model.diffusion_model.scaled_fp8")


def _is_aux(key: str) -> bool:
    return key in AUX_KEYS or key.endswith(AUX_SUFFIXES) or key.endswith(tuple("." + k for k in AUX_KEYS))


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors file's header; return its tensors and its `__metadata__`."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(path, f"'{path.suffix}' files are pickle-based and are never opened, for safety",
                              "a .safetensors file")
    if path.suffix.lower() == ".gguf":
        raise CheckpointError(path, "GGUF files are not supported", "a .safetensors file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 1 or n > min(MAX_HEADER, size - 8):
                raise CheckpointError(path, f"not a safetensors file (file of {size} bytes, unreadable header)",
                                      "a .safetensors file")
            raw = fh.read(n)
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(path, "not a safetensors file (its header is not JSON)", "a .safetensors file") from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(path, "damaged header: '__metadata__' is not a mapping")
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        dtype, shape, a, b = _entry(path, name, entry)
        itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
        if b - a != math.prod(shape) * itemsize:
            raise CheckpointError(path, f"damaged header: tensor '{name}' spans {b - a} bytes for shape {list(shape)}")
        infos[name] = TensorInfo(dtype, shape, path, base + a, base + b)
        spans.append((a, b, name))
    # Tensors must tile the data area without overlapping (as the safetensors format requires).
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise CheckpointError(path, f"damaged header: tensors '{first}' and '{second}' overlap")
    data_end = spans[-1][1] if spans else 0
    if base + data_end > size:
        raise CheckpointError(path, f"truncated: the file has {size} bytes but its header describes {base + data_end}"
                                    " (an interrupted download or copy?)")
    return infos, {str(k): str(v) for k, v in metadata.items()}


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry(path: Path, name: str, entry: object) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, start, end) of one header entry, every field type-checked."""
    ok = isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and isinstance(entry.get("shape"), list)
    offsets = entry.get("data_offsets") if ok else None
    ok = ok and all(_is_count(s) for s in entry["shape"]) and isinstance(offsets, list) and len(offsets) == 2
    if not ok or not all(_is_count(o) for o in offsets) or offsets[0] > offsets[1]:
        raise CheckpointError(path, f"damaged header entry for tensor '{name}'")
    if entry["dtype"] not in DTYPES:
        raise CheckpointError(path, f"tensor '{name}' has unsupported dtype {entry['dtype']}",
                              "one of " + ", ".join(DTYPES))
    return entry["dtype"], tuple(entry["shape"]), offsets[0], offsets[1]


def count_indexed(keys: list[str], pattern: str) -> int:
    r"""1 + the largest N in the keys that `pattern` (with one `(\d+)` group) matches at their start, else 0.

    How many blocks or layers a checkpoint holds, e.g. count_indexed(keys, r"encoder\.block\.(\d+)\.").
    """
    return 1 + max((int(m[1]) for k in keys if (m := re.match(pattern, k))), default=-1)


def shard_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: those named by an index json if there is one, else all of them."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
            names = set(weight_map.values())
            if not all(isinstance(f, str) for f in names):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise CheckpointError(indexes[0], "damaged index file (no valid 'weight_map')") from None
        files = sorted(folder / f for f in names)
        outside = [f for f in names if Path(f).name != f]
        if outside:
            raise CheckpointError(indexes[0], f"names a shard outside its folder: {outside[0]!r}")
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(folder, f"shard(s) named by {indexes[0].name} are missing: {', '.join(missing)}")
        return files
    return sorted(folder.glob("*.safetensors"))


def resolve_model_path(path: object, sub: str) -> Path:
    """`path` as a Path; a folder holding a `sub/` folder (a diffusers repository root) stands for that folder
    (transformer/, vae/, text_encoder/, text_encoder_2/)."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(repr(path), "is not a path", "a .safetensors file or a folder of them")
    p = Path(path).expanduser()
    try:
        if p.is_dir() and (p / sub).is_dir():
            return p / sub
    except OSError:
        pass  # unusable path: Checkpoint says why
    return p


class Checkpoint:
    """The tensors of one safetensors file or of a folder of shards, read lazily and validated up front."""

    def __init__(self, path: str | os.PathLike):
        if not isinstance(path, (str, os.PathLike)):
            raise CheckpointError(repr(path), "is not a path", "a .safetensors file or a folder of them")
        self.path = Path(path).expanduser()
        try:
            exists = self.path.exists()
        except OSError as exc:  # e.g. a name too long for the file system
            raise CheckpointError(self.path, f"cannot be accessed: {exc.strerror or exc}") from None
        if not exists:
            raise CheckpointError(self.path, "no such file or folder")
        if self.path.is_dir():
            self.files = shard_files(self.path)
            if not self.files:
                raise CheckpointError(self.path, "folder holds no .safetensors weights")
        else:
            self.files = [self.path]
        self.infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for f in self.files:
            infos, meta = read_header(f)
            clash = next((k for k in infos if k in self.infos), None)
            if clash is not None:  # e.g. a folder holding two different checkpoints: never mix them silently
                raise CheckpointError(self.path, f"tensor '{clash}' is in both {self.infos[clash].file.name} and "
                                                 f"{f.name}: the folder holds more than one model; pass one file")
            self.infos.update(infos)
            self.metadata = self.metadata or meta
        if not self.infos:
            raise CheckpointError(self.path, "holds no tensors")
        self.quantized = describe_quantized(self)  # weight key -> how it is stored, validated up front
        self.config: dict = {}
        cfg = self.path / "config.json" if self.path.is_dir() else None
        if cfg is not None and cfg.exists():
            try:
                self.config = json.loads(cfg.read_text())
            except (ValueError, RecursionError):
                raise CheckpointError(cfg, "config.json is not valid JSON") from None
            if not isinstance(self.config, dict):
                raise CheckpointError(cfg, "config.json does not hold a JSON object")

    # ---- inspection (header only, no tensor data is read) ----
    def keys(self) -> list[str]:
        return list(self.infos)

    def weight_keys(self) -> list[str]:
        """Keys that are model tensors, without the scale tensors and markers of fp8-scaled layouts."""
        return [k for k in self.infos if not _is_aux(k)]

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape `read(key)` returns (a packed NVFP4 weight [N, K/2] is [N, K])."""
        q = self.quantized.get(key)
        return q.format.logical_shape(self.infos[key].shape) if q else self.infos[key].shape

    def stored_shape(self, key: str) -> tuple[int, ...]:
        return self.infos[key].shape

    def dims(self, key: str, ndim: int) -> tuple[int, ...]:
        """The shape of `key`, checked to have `ndim` non-empty dimensions (configs are read off these)."""
        shape = self.shape(key)
        if len(shape) != ndim or not all(shape):
            raise CheckpointError(self.path, f"tensor '{key}' has shape {list(shape)}",
                                  f"a {ndim}-dimensional tensor with no empty dimension")
        return shape

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self.infos[key].dtype]

    @property
    def is_quantized(self) -> bool:
        return bool(self.quantized)

    # ---- data ----
    def raw(self, key: str) -> torch.Tensor:
        """One tensor exactly as stored, copied out of a memory map whose pages are released afterwards."""
        info = self.infos[key]
        dtype = DTYPES[info.dtype]
        out = torch.empty(info.shape, dtype=dtype)
        nbytes = info.end - info.start
        if nbytes:
            dst = out.view(-1).view(torch.uint8).numpy()
            with open(info.file, "rb") as fh:
                page = mmap.ALLOCATIONGRANULARITY
                lo = info.start - info.start % page
                with mmap.mmap(fh.fileno(), info.end - lo, access=mmap.ACCESS_READ, offset=lo) as mm:
                    dst[:] = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=info.start - lo)
                    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                        mm.madvise(mmap.MADV_DONTNEED)  # drop the mapped pages: RSS stays at one tensor
                    del dst
        return out

    def read(self, key: str) -> torch.Tensor:
        """A model tensor in a float dtype: quantised weights are dequantised to float32 with their scales."""
        if key in self.quantized:
            return self.quantized[key].format.read(self, self.quantized[key])
        t = self.raw(key)
        return t.float() if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t
