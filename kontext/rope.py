"""Rotary position embedding over 3-axis token ids (index, row, col), as in BFL's Flux.

Each axis gets its own slice of the head dimension; pairs of channels (2i, 2i+1) are rotated by angle
pos * theta^(-2i/dim). The tables are built once per run (`positions`), outside the per-step graph: the angles are
evaluated in float64, as both reference implementations do, and stored as float32 cos/sin tables, so the per-step
rotation is float32 only (TensorRT has no float64) and fp32 results still match the references to rounding.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Positions(NamedTuple):
    """RoPE tables [B or 1, 1, N, head_dim/2] in float32, broadcast over heads; N covers text then image tokens."""
    cos: torch.Tensor
    sin: torch.Tensor


def rope_angles(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> torch.Tensor:
    """ids [B, N, n_axes] -> angles [B, N, head_dim/2] (float64), axis slices concatenated."""
    parts = []
    for axis, dim in enumerate(axes_dim):
        scale = torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim
        omega = 1.0 / theta**scale  # [dim/2]
        parts.append(ids[..., axis].to(torch.float64)[..., None] * omega)  # [B, N, dim/2]
    return torch.cat(parts, dim=-1)


def positions(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> Positions:
    """The float32 cos and sin tables for token ids [B, N, 3] (text ids first, then image ids)."""
    angles = rope_angles(ids, axes_dim, theta)[:, None]  # [B, 1, N, head_dim/2]
    return Positions(angles.cos().float(), angles.sin().float())


def apply_rope(x: torch.Tensor, pe: Positions) -> torch.Tensor:
    """Rotate channel pairs of x [B, H, N, D] by the tables' angles, in float32; returns x's dtype."""
    xf = x.float().unflatten(-1, (-1, 2))  # [B, H, N, D/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * pe.cos - x1 * pe.sin, x0 * pe.sin + x1 * pe.cos), dim=-1)
    return out.flatten(-2).type_as(x)
