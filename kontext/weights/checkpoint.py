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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import CheckpointError

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
AUX_KEYS = {"scaled_fp8"}


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
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(path, "not a safetensors file (its header is not JSON)", "a .safetensors file") from None
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        try:
            dtype, shape, (a, b) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(path, f"damaged header entry for tensor '{name}'") from None
        if dtype not in DTYPES:
            raise CheckpointError(path, f"tensor '{name}' has unsupported dtype {dtype}",
                                  "one of " + ", ".join(DTYPES))
        itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
        if b - a != math.prod(shape) * itemsize or a < 0:
            raise CheckpointError(path, f"damaged header: tensor '{name}' spans {b - a} bytes for shape {list(shape)}")
        infos[name] = TensorInfo(dtype, shape, path, base + a, base + b)
        data_end = max(data_end, b)
    if base + data_end > size:
        raise CheckpointError(path, f"truncated: the file has {size} bytes but its header describes {base + data_end}"
                                    " (an interrupted download or copy?)")
    return infos, {str(k): str(v) for k, v in metadata.items()}


def shard_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: those named by an index json if there is one, else all of them."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(indexes[0], "damaged index file (no 'weight_map')") from None
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(folder, f"shard(s) named by {indexes[0].name} are missing: {', '.join(missing)}")
        return files
    return sorted(folder.glob("*.safetensors"))


class Checkpoint:
    """The tensors of one safetensors file or of a folder of shards, read lazily and validated up front."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        if not self.path.exists():
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
            self.infos.update(infos)
            self.metadata = self.metadata or meta
        if not self.infos:
            raise CheckpointError(self.path, "holds no tensors")
        self.config: dict = {}
        cfg = self.path / "config.json" if self.path.is_dir() else None
        if cfg is not None and cfg.exists():
            try:
                self.config = json.loads(cfg.read_text())
            except ValueError:
                raise CheckpointError(cfg, "config.json is not valid JSON") from None

    # ---- inspection (header only, no tensor data is read) ----
    def keys(self) -> list[str]:
        return list(self.infos)

    def weight_keys(self) -> list[str]:
        """Keys that are model tensors, without the scale tensors and markers of fp8-scaled layouts."""
        return [k for k in self.infos if k not in AUX_KEYS and not k.endswith(AUX_SUFFIXES)]

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def shape(self, key: str) -> tuple[int, ...]:
        return self.infos[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self.infos[key].dtype]

    @property
    def is_fp8_scaled(self) -> bool:
        return "scaled_fp8" in self.infos or any(k.endswith(SCALE_SUFFIXES) for k in self.infos)

    def scale_key(self, key: str) -> str | None:
        """The per-layer scale of an fp8 weight `key`, if the file stores one."""
        stem = key[: -len(".weight")] if key.endswith(".weight") else None
        if stem is None:
            return None
        for suffix in SCALE_SUFFIXES:
            if stem + suffix in self.infos:
                return stem + suffix
        return None

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
        """A model tensor in a float dtype: fp8 weights with a stored scale are dequantised (`w.float() * scale`)."""
        t = self.raw(key)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            t = t.float()
            sk = self.scale_key(key)
            if sk is not None:
                scale = self.raw(sk).float()
                # Per-tensor scales are scalars; per-output-channel scales broadcast over the input dim.
                t = t * (scale.reshape(-1, *([1] * (t.dim() - 1))) if scale.numel() > 1 else scale.reshape(()))
        return t

    def iter(self, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for k in keys:
            yield k, self.read(k)
