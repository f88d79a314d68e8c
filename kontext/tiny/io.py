"""Writing the tiny models' tensors: one safetensors file, or a folder of shards with their index json."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

PT = {"format": "pt"}  # the metadata torch-side writers (save_pretrained) put in every file


def save(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write `state` to the safetensors file `path` (its folder created), with `metadata` (else PT); returns path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: t.contiguous() for k, t in state.items()}, str(path), metadata=PT if metadata is None else metadata)
    return path


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
