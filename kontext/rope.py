"""Rotary position embedding over 3-axis token ids (index, row, col), as in BFL's Flux.

Each axis gets its own slice of the head dimension; pairs of channels (2i, 2i+1) are rotated by angle
pos * theta^(-2i/dim). Angles are computed in float64 (as both reference implementations do) and the rotation is
applied in float32, so fp32 results match them to rounding.
"""
from __future__ import annotations

import torch


def rope_angles(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> torch.Tensor:
    """ids [B, N, n_axes] -> angles [B, N, head_dim/2] (float64), axis slices concatenated."""
    parts = []
    for axis, dim in enumerate(axes_dim):
        scale = torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim
        omega = 1.0 / theta**scale  # [dim/2]
        parts.append(ids[..., axis].to(torch.float64)[..., None] * omega)  # [B, N, dim/2]
    return torch.cat(parts, dim=-1)


def rope_cos_sin(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [B, 1, N, head_dim/2] in float32, broadcast over heads."""
    angles = rope_angles(ids, axes_dim, theta)[:, None]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of x [B, H, N, D] by the angles; returns x's dtype."""
    xf = x.float().unflatten(-1, (-1, 2))  # [B, H, N, D/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)
