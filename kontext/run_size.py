"""The size of a sampling run from what it is given: explicit sides, an initial latent, the first reference. And what
that size costs: the tokens the DiT sees and a bound of its working memory.

Decisions:
- Without explicit sides an initial latent is followed exactly, even off the 16-pixel grid (ComfyUI's VAEEncode
  crops to 8; odd latents are padded to whole patches), and it sets the batch.
- Explicit sides must then match it; without one, the first reference sets the size, else 1024x1024 (see
  kontext.references.output_size).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import InputError
from .ids import tokens as patches
from .references import output_size
from .sampling import LATENT_CHANNELS

LATENT_SCALE = 8  # pixels per latent pixel


@dataclass(frozen=True)
class RunSize:
    """Output size in pixels (multiples of 8) and the batch (prompts x images)."""
    width: int
    height: int
    batch: int = 1

    @property
    def latent(self) -> tuple[int, int]:
        """(h, w) in latent pixels."""
        return self.height // LATENT_SCALE, self.width // LATENT_SCALE


def check_latent(samples: object, what: str = "latent") -> torch.Tensor:
    """A latent's samples, checked: [batch, 16, h, w]."""
    if not isinstance(samples, torch.Tensor) or samples.dim() != 4 or samples.shape[1] != LATENT_CHANNELS:
        raise InputError(f"{what}: expected a Flux LATENT with samples [batch, {LATENT_CHANNELS}, h, w]")
    return samples


def _pixels(latent: torch.Tensor) -> tuple[int, int]:
    return latent.shape[-1] * LATENT_SCALE, latent.shape[-2] * LATENT_SCALE


def run_size(width: int | None, height: int | None, init_latent: torch.Tensor | None = None,
             ref_latents: Sequence[torch.Tensor] = (), denoise: float = 1.0) -> RunSize:
    """The run's size: `width`/`height` (None or 0: unset), else the initial latent's, else the first reference's,
    else 1024x1024; an initial latent [B, 16, h, w] also sets the batch."""
    width, height = width or None, height or None
    if init_latent is not None:
        size_from: tuple[int, int] | None = _pixels(init_latent)
    elif ref_latents:
        size_from = _pixels(ref_latents[0])
    elif denoise < 1.0:
        raise InputError("denoise below 1 needs the latent input (e.g. Kontext VAE Encode of the image to "
                         "start from); with denoise 1 leave it empty")
    else:
        size_from = None
    if init_latent is None:
        return RunSize(*output_size(width, height, size_from))
    assert size_from is not None
    if width is None and height is None:
        w, h = size_from
        output_size(w // 16 * 16, h // 16 * 16)  # range check only: the latent is followed exactly
        return RunSize(w, h, init_latent.shape[0])
    w, h = output_size(width, height, size_from)
    if (w, h) != size_from:
        raise InputError(f"the latent input is {size_from[0]}x{size_from[1]} but width/height ask for "
                         f"{w}x{h}: set both to 0 to follow the latent, or match its size")
    return RunSize(w, h, init_latent.shape[0])


def token_count(size: RunSize, ref_latents: Sequence[torch.Tensor], text_len: int) -> int:
    """Tokens in the joint sequence: the text, the target's image tokens and every reference's."""
    latent_sizes = [size.latent] + [tuple(r.shape[-2:]) for r in ref_latents]
    return text_len + sum(patches(h) * patches(w) for h, w in latent_sizes)


def activation_bytes(tokens: int, hidden: int, batch: int, passes: int, dtype: torch.dtype) -> int:
    """A rough upper bound of the DiT's working memory: ~24 hidden-sized activations per token alive at once."""
    return int(tokens * hidden * batch * passes * 24 * torch.tensor([], dtype=dtype).element_size())
