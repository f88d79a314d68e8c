"""Writing the tiny models' tensors: one safetensors file, or a folder of shards with their index json.

Files come out the same byte for byte on every run: safetensors writes its metadata in hash-map order, which changes
from process to process, so the header is rewritten with the metadata keys sorted.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import safetensors.torch
import torch

PT = {"format": "pt"}  # the metadata torch-side writers (save_pretrained) put in every file


def save(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write `state` to the safetensors file `path` (its folder created), with `metadata` (else PT); returns path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = safetensors.torch.save({k: t.contiguous() for k, t in state.items()}, PT if metadata is None else metadata)
    path.write_bytes(_sorted_metadata(data))
    return path


def _sorted_metadata(data: bytes) -> bytes:
    """A safetensors file's bytes with the `__metadata__` entries of its header in key order (tensors untouched)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data that follows starts 8-byte aligned, as safetensors pads it
    return len(text).to_bytes(8, "little") + text + data[8 + size:]


def save_sharded(state: dict[str, torch.Tensor], folder: str | Path, stem: str = "diffusion_pytorch_model",
                 shards: int = 2, metadata: dict[str, str] | None = None) -> Path:
    """`state` as save_pretrained writes it: `{stem}-00001-of-0000N.safetensors` ... in key order, each with
    `metadata` (else PT), and `{stem}.safetensors.index.json` mapping every key to its shard; returns folder."""
    folder = Path(folder)
    keys = list(state)
    per = math.ceil(len(keys) / shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i * per:(i + 1) * per]}
        save(part, folder / name, metadata)
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder
