"""Decoding large latents in overlapping tiles, as a fallback when the whole decode runs out of GPU memory.

The Flux decoder's activations at full resolution (128-512 channels at 8x the latent size) dominate VAE memory, so a
decode that does not fit is retried tile by tile, as ComfyUI's VAEDecode does. Tiles overlap and are blended with
linear ramps to hide seams; the mid-block attention then sees one tile at a time, so the result differs slightly
from a whole decode. Only used when the whole decode fails.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def _ramp(n: int, overlap: int, at_start: bool, at_end: bool) -> torch.Tensor:
    """Blend weights along one side of a tile: rising over `overlap` unless the tile touches that image edge."""
    w = torch.ones(n)
    if overlap > 0:
        r = torch.linspace(0, 1, overlap + 2)[1:-1]
        if not at_start:
            w[:overlap] = r
        if not at_end:
            w[-overlap:] = r.flip(0)
    return w


def _starts(size: int, tile: int, step: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, step)) + [size - tile]
    return sorted(set(starts))


@torch.no_grad()
def decode_tiled(vae, z: torch.Tensor, tile: int = 64, overlap: int = 16) -> torch.Tensor:
    """Decode a raw latent [B, 16, h, w] in latent tiles of `tile` with `overlap`; pixels [B, 3, 8h, 8w] (float32)."""
    f = vae.config.downscale
    B, _, h, w = z.shape
    out = torch.zeros(B, 3, h * f, w * f)
    weight = torch.zeros(1, 1, h * f, w * f)
    step = max(1, tile - overlap)
    for y in _starts(h, tile, step):
        for x in _starts(w, tile, step):
            th, tw = min(tile, h), min(tile, w)
            px = vae.decode(z[:, :, y:y + th, x:x + tw]).float().cpu()
            wy = _ramp(th * f, overlap * f, y == 0, y + th >= h)
            wx = _ramp(tw * f, overlap * f, x == 0, x + tw >= w)
            mask = (wy[:, None] * wx[None, :])[None, None]
            out[:, :, y * f:(y + th) * f, x * f:(x + tw) * f] += px * mask
            weight[:, :, y * f:(y + th) * f, x * f:(x + tw) * f] += mask
    return out / weight


def decode_or_tiled(vae, z: torch.Tensor) -> torch.Tensor:
    """The whole decode; on a GPU out-of-memory error, the tiled decode instead (with a warning)."""
    try:
        return vae.decode(z)
    except torch.OutOfMemoryError:
        log.warning("VAE decode of a %dx%d image ran out of GPU memory; decoding in tiles instead",
                    z.shape[3] * vae.config.downscale, z.shape[2] * vae.config.downscale)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return decode_tiled(vae, z)
