"""The numbers of a LoRA patch, exactly as ComfyUI computes them (comfy/lora.py `calculate_weight`,
comfy/weight_adapter/lora.py, `weight_decompose` in comfy/weight_adapter/base.py), in float32.

Pure functions on tensors: merging into a model, restoring it, run-time branches and fp8 are the callers' business.
The operations and their order follow ComfyUI's so that the results agree to float32 rounding, not just in theory:
a LoRA adds (strength * alpha / rank) * (up @ down); a full delta adds strength * diff; DoRA rescales W + delta per
output row or input column by `dora_scale` over a norm, then blends with the old weight by strength.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .formats import LoraPatch

F32 = torch.float32


def lora_delta(patch: LoraPatch, weight: torch.Tensor, strength: float) -> torch.Tensor:
    """The new value of `weight` with `patch` at `strength`, in float32 (a new tensor; `weight` is not changed).

    `weight` is what the patch applies to: the parameter, or its rows `patch.rows` when the patch has them."""
    w = weight.to(F32, copy=True)
    if patch.kind == "diff":
        _check(patch, w, patch.diff.shape)
        if strength != 0.0:  # ComfyUI skips a zero-strength delta (so a NaN delta at 0 changes nothing)
            w += strength * patch.diff.to(device=w.device, dtype=F32)
        return w
    if patch.kind != "lora":
        raise ValueError(f"unknown patch kind {patch.kind!r}")
    up = patch.up.to(device=w.device, dtype=F32)
    down = patch.down.to(device=w.device, dtype=F32)
    _check(patch, w, (up.shape[0], down.shape[1]))
    scale = patch.alpha / down.shape[0] if patch.alpha is not None else 1.0
    lora_diff = torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1)).reshape(w.shape)
    if patch.dora_scale is not None:
        return weight_decompose(patch.dora_scale, w, lora_diff, scale, strength)
    w += ((strength * scale) * lora_diff).type(w.dtype)
    return w


def weight_decompose(dora_scale: torch.Tensor, weight: torch.Tensor, lora_diff: torch.Tensor, scale: float,
                     strength: float) -> torch.Tensor:
    """DoRA as ComfyUI's weight_decompose, in place on the float32 `weight` (returned). Its quirk is kept: with a
    per-output-row scale the norm is the *old* weight's, with a per-input-column one it is the new weight's."""
    dora_scale = dora_scale.to(device=weight.device, dtype=F32)
    lora_diff *= scale
    weight_calc = weight + lora_diff.type(weight.dtype)
    if dora_scale.shape[0] == weight_calc.shape[0]:  # on the output axis
        weight_norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True) \
            .reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        weight_norm = weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True) \
            .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1)).transpose(0, 1)
    weight_norm = weight_norm + torch.finfo(weight.dtype).eps
    weight_calc *= (dora_scale / weight_norm).type(weight.dtype)
    if strength != 1.0:
        weight_calc -= weight
        weight += strength * weight_calc
    else:
        weight[:] = weight_calc
    return weight


def apply_patches(weight: torch.Tensor, patches: Sequence[LoraPatch],
                  strengths: float | Sequence[float]) -> torch.Tensor:
    """One parameter with `patches` applied in order (each on its rows), in float32; `weight` is not changed.

    `strengths`: one per patch, or one for all. Patches of one file touch disjoint rows, so their order does not
    matter; patches of several files stack in the given order, as ComfyUI stacks LoRA loaders."""
    if isinstance(strengths, (int, float)):
        strengths = [float(strengths)] * len(patches)
    if len(strengths) != len(patches):
        raise ValueError(f"{len(patches)} patches but {len(strengths)} strengths")
    out = weight.to(F32, copy=True)
    for patch, strength in zip(patches, strengths):
        if patch.rows is None:
            out = lora_delta(patch, out, strength)
            continue
        start, stop = patch.rows
        if not 0 <= start < stop <= out.shape[0]:
            raise ValueError(f"{patch.target}: rows {start}:{stop} are outside its {out.shape[0]} rows")
        out[start:stop] = lora_delta(patch, out[start:stop], strength)
    return out


def _check(patch: LoraPatch, w: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(shape) != tuple(w.shape):
        rows = "" if patch.rows is None else f" rows {patch.rows[0]}:{patch.rows[1]}"
        raise ValueError(f"{patch.target}{rows}: the patch is {list(shape)} but the weight is {list(w.shape)} "
                         f"(from {', '.join(patch.source_keys)})")
