"""The Flux latent space's scale and shift: a raw VAE latent (ComfyUI's LATENT) <-> the space the DiT works in.

`(raw - SHIFT) * SCALE`, the release vae/config.json's scaling_factor and shift_factor, applied around the DiT as
ComfyUI does, so that our latents and ComfyUI's are equal. Its own module so that the sampler and the denoiser need
not import the autoencoder.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SCALE = 0.3611
SHIFT = 0.1159


def to_model_space(raw: torch.Tensor) -> torch.Tensor:
    """A raw VAE latent (ComfyUI's LATENT) as the DiT sees it."""
    return (raw - SHIFT) * SCALE


def to_raw(z: torch.Tensor) -> torch.Tensor:
    """The inverse of to_model_space."""
    return z / SCALE + SHIFT
