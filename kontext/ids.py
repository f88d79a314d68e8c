"""Token ids (index, row, col) for the target image, the reference images and the text.

Sizes are given in latent pixels (1/8 of the image); each token covers a 2x2 latent patch, and a latent with an odd
side is padded up to whole patches (as ComfyUI does), so its grid is ceil(h/2) x ceil(w/2). The target has index 0 at
the origin. References are placed by one of two methods:
- "offset" (ComfyUI's default, also diffusers' single-reference layout): every reference has index 1 and they are laid
  side by side on one shared canvas: each next reference goes right of the canvas built so far if the canvas would
  otherwise grow taller than wide, else below it, so no two references share a position. Offsets are counted in latent
  pixels and rounded to tokens exactly as ComfyUI rounds them.
- "index": reference k gets index k (1, 2, 3, ...) at the origin; positions may overlap, the index tells them apart.
"""
from __future__ import annotations

import torch

METHODS = ("offset", "index")


def grid_ids(h: int, w: int, index: int = 0, h_offset: int = 0, w_offset: int = 0) -> torch.Tensor:
    """Ids [h*w, 3] of an h x w token grid, row-major, matching the packing order of the tokens."""
    ids = torch.zeros(h, w, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h_offset, h_offset + h, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(w_offset, w_offset + w, dtype=torch.float32)[None, :]
    return ids.reshape(h * w, 3)


def tokens(n: int) -> int:
    """Patches along a latent side of n pixels (odd sides are padded up)."""
    return (n + 1) // 2


def reference_ids(sizes: list[tuple[int, int]], method: str = "offset") -> list[torch.Tensor]:
    """Ids for references of latent sizes [(h, w), ...], one [tokens(h)*tokens(w), 3] tensor each."""
    if method not in METHODS:
        raise ValueError(f"unknown reference id method {method!r}; expected one of {METHODS}")
    out = []
    canvas_h = canvas_w = 0
    for k, (h, w) in enumerate(sizes):
        if method == "index":
            out.append(grid_ids(tokens(h), tokens(w), index=k + 1))
            continue
        # Grow the canvas along its shorter side: right when that keeps it no taller than wide, else down.
        h_off = w_off = 0
        if h + canvas_h > w + canvas_w:
            w_off = canvas_w
        else:
            h_off = canvas_h
        out.append(grid_ids(tokens(h), tokens(w), index=1, h_offset=tokens(h_off), w_offset=tokens(w_off)))
        canvas_h = max(canvas_h, h + h_off)
        canvas_w = max(canvas_w, w + w_off)
    return out


def image_ids(target: tuple[int, int], references: list[tuple[int, int]], method: str = "offset",
              batch: int = 1) -> torch.Tensor:
    """Ids [B, N, 3] for the target followed by every reference, in token order; sizes in latent pixels (h, w)."""
    parts = [grid_ids(tokens(target[0]), tokens(target[1]))] + reference_ids(references, method)
    return torch.cat(parts).unsqueeze(0).expand(batch, -1, -1)


def text_ids(length: int, batch: int = 1) -> torch.Tensor:
    """Text tokens carry no position: all-zero ids [B, L, 3]."""
    return torch.zeros(batch, length, 3)
