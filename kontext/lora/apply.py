"""LoRAs on a loaded DiT, without touching the base model.

`with_loras(dit, [(path, strength), ...])` returns a DiT that shares every module and tensor of `dit` except the
layers a LoRA changes, which are fresh copies: the base stays exactly as loaded (another pipeline or workflow may
share it), and dropping the LoRAs, or changing a strength, is just calling it again on the base.

How each changed layer gets its LoRAs:
- dense weights (bf16, fp16, fp32): merged, W + sum of strength * (alpha / rank) * up @ down (and DoRA, full deltas),
  computed in float32 as ComfyUI does and rounded once: no cost per step. `mode="branch"` keeps them as a low-rank
  branch instead (x @ down^T @ up^T added to the output), for quick strength changes on big models;
- fp8 / fp4 weights: a low-rank branch beside the quantised matmul, so the base is never re-quantised (as Nunchaku
  does it); LoRAs that are not low rank (DoRA, full deltas) are applied to the dequantised weight at each call.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import nn

from ..errors import InputError
from ..formats import layer_format
from ..module_tree import copy_path, shallow_copy
from .formats import LoraFile, LoraPatch, read_lora
from .math import apply_patches

log = logging.getLogger(__name__)
LoraSpec = Union[str, os.PathLike, LoraFile]
MODES = ("auto", "merge", "branch")


@dataclass
class Branch:
    """One layer's low-rank LoRAs, joined: out += up @ (down @ x), up [out, R] already scaled, down [R, in]."""
    down: torch.Tensor
    up: torch.Tensor


def group(files: Sequence[tuple[LoraFile, float]]) -> dict[str, list[tuple[LoraPatch, float]]]:
    """Layer name -> its (patch, strength) pairs from every file, in file order (stacking)."""
    out: dict[str, list[tuple[LoraPatch, float]]] = {}
    for f, strength in files:
        for p in f.patches:
            out.setdefault(p.target.rsplit(".", 1)[0], []).append((p, strength))
    return out


def low_rank(patches: list[tuple[LoraPatch, float]], out_features: int) -> Branch | None:
    """The layer's plain LoRAs (weight, no DoRA) as one joined branch; None if any is not low rank."""
    downs, ups = [], []
    for p, s in patches:
        if p.kind != "lora" or p.dora_scale is not None or not p.target.endswith(".weight"):
            return None
        rank = p.down.shape[0]
        scale = s * ((p.alpha / rank) if p.alpha is not None else 1.0)
        up = torch.zeros(out_features, rank)
        start, stop = p.rows if p.rows is not None else (0, out_features)
        up[start:stop] = p.up.float() * scale
        downs.append(p.down.float())
        ups.append(up)
    return Branch(torch.cat(downs, 0), torch.cat(ups, 1))


def check_loras(loras: Sequence[tuple[LoraSpec, float]], mode: str = "auto") -> None:
    """The arguments' shape and numbers, before any file is read."""
    if mode not in MODES:
        raise InputError(f"LoRA mode must be one of {', '.join(MODES)}, got {mode!r}")
    if isinstance(loras, (str, bytes, os.PathLike)):
        raise InputError("loras must be a list of (file, strength) pairs")
    for item in loras:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise InputError(f"each LoRA must be a (file, strength) pair, got {item!r}")
        strength = item[1]
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or strength != strength \
                or abs(strength) == float("inf"):
            raise InputError(f"LoRA strength must be a finite number, got {strength!r}")


def read_all(loras: Sequence[tuple[LoraSpec, float]], config) -> list[tuple[LoraFile, float]]:
    """Every LoRA read and checked against the model's shapes (files already read are kept)."""
    check_loras(loras)
    files = []
    for spec, strength in loras:
        f = spec if isinstance(spec, LoraFile) else read_lora(spec, config)
        if f.unmatched and not isinstance(spec, LoraFile):
            log.warning("LoRA %s: %d keys match no layer of this model and are ignored (e.g. %s)", f.path,
                        len(f.unmatched), ", ".join(f.unmatched[:3]))
        files.append((f, float(strength)))
    return files


def with_loras(dit: nn.Module, loras: Sequence[tuple[LoraSpec, float]], mode: str = "auto") -> nn.Module:
    """A DiT with `loras` [(file, strength), ...] applied; `dit` itself is never changed."""
    check_loras(loras, mode)
    files = read_all(loras, dit.config)
    out = shallow_copy(dit)
    for name, patches in group(files).items():
        layer = copy_path(out, name)
        fmt = layer_format(layer)
        on_bias = [(p, s) for p, s in patches if p.target.endswith(".bias")]
        on_weight = [(p, s) for p, s in patches if not p.target.endswith(".bias")]
        branch = low_rank(on_weight, layer.out_features) if on_weight and hasattr(layer, "out_features") else None
        if (fmt is None or not fmt.quantized) and (mode != "branch" or branch is None):
            _merge(layer, patches)
            continue
        _merge(layer, on_bias)  # biases are dense at every precision: merged
        if branch is not None:
            layer.lora_branch = _to(branch, layer)
        elif on_weight:  # DoRA or full deltas on quantised weights: on the dequantised weight at each call
            layer.weight_function = list(getattr(layer, "weight_function", [])) + [_RunTime(on_weight)]
    log.info("LoRAs applied: %s", ", ".join(f"{f.path} ({f.format}, {len(f.patches)} patches) x {s:g}"
                                            for f, s in files))
    return out


def _to(branch: Branch, layer: nn.Module) -> Branch:
    device = layer.weight.device
    return Branch(branch.down.to(device), branch.up.to(device))


def _merge(layer: nn.Module, patches: list[tuple[LoraPatch, float]]) -> None:
    """Merged weight (and bias), float32 then one rounding, as new Parameters: the base's tensors stay intact."""
    for leaf in ("weight", "bias"):
        mine = [(p, s) for p, s in patches if p.target.endswith("." + leaf)]
        if not mine:
            continue
        base = getattr(layer, leaf)
        new = apply_patches(base.float(), [p for p, _ in mine], [s for _, s in mine])
        layer._parameters[leaf] = nn.Parameter(new.to(base.dtype), requires_grad=False)


class _RunTime:
    """A weight function: the LoRAs applied to the (dequantised) weight at each call."""

    def __init__(self, patches: list[tuple[LoraPatch, float]]):
        self.patches = [p for p, _ in patches if p.target.endswith(".weight")]
        self.strengths = [s for p, s in patches if p.target.endswith(".weight")]

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        return apply_patches(w.float(), self.patches, self.strengths).to(w.dtype)
