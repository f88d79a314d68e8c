"""The denoiser: the one way every caller reaches the DiT.

Built once per run from the DiT, the reference latents and the reference method, it holds everything that does not
change from step to step: the packed reference tokens, the token ids and the RoPE tables (float32, per text length).
Each call then maps (latent, sigma, text conditioning, guidance) to a velocity:

    velocity = denoiser(z [B, 16, h, w] model-space latent, sigma, txt [B, L, 4096], pooled [B, 768], guidance [B])

The library's sampler, the Kontext Sampler node and the ComfyUI MODEL all call it; offloading, LoRA and other
backends (TensorRT) plug in behind the backend's `token_forward` (kontext.backend.DiTBackend), which sees only
BFL-convention tensors and the positions built here once per run.
"""
from __future__ import annotations

from typing import Generic, Sequence

import torch

from .backend import DiTBackend, P
from .dit import PLAIN, BlockRunner
from .errors import InputError
from .ids import image_ids, text_ids, tokens
from .sampling import LATENT_CHANNELS, pack, pad_to_patches, unpack
from .latents import to_model_space


def reference_tokens(latent: torch.Tensor, space: str = "raw") -> torch.Tensor:
    """A reference latent [B, 16, h, w] as packed model-space tokens [B, N, 64] (odd sides padded). `space` is
    "raw" for the VAE's own latents (ours, ComfyUI's LATENT), "model" for ones already scaled and shifted (what
    ComfyUI's Flux model receives as ref_latents)."""
    if latent.dim() != 4 or latent.shape[1] != LATENT_CHANNELS:
        raise InputError(f"reference latent of shape {list(latent.shape)}: expected [B, {LATENT_CHANNELS}, h, w]")
    z = to_model_space(latent.float()) if space == "raw" else latent.float()
    return pack(pad_to_patches(z))


class Denoiser(Generic[P]):
    """A DiT backend + references for one run: `__call__(z, sigma, txt, pooled, guidance) -> velocity [B, 16, h, w]`."""

    def __init__(self, dit: DiTBackend[P], latent_size: tuple[int, int], ref_latents: Sequence[torch.Tensor] = (),
                 reference_method: str = "offset", device: torch.device | str | None = None, ref_space: str = "raw"):
        """`latent_size` (h, w) is the target's, in latent pixels; `ref_latents` are VAE latents [1 or B, 16, h, w]
        of any sizes, raw (`ref_space="raw"`) or model-space ("model")."""
        self.dit = dit
        self.h, self.w = latent_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.method = reference_method
        self.n_target = tokens(self.h) * tokens(self.w)
        self.refs = [reference_tokens(r, ref_space).to(self.device) for r in ref_latents]  # each [1 or B, N_k, 64]
        self._joined: dict[int, torch.Tensor] = {}  # the references' tokens joined, by batch size
        # Ids are the same for every image of a batch: one row, broadcast.
        self.img_ids = image_ids((self.h, self.w), [tuple(r.shape[2:]) for r in ref_latents], reference_method,
                                 1).to(self.device)
        self._pe: dict[int, P] = {}  # by text length: computed once per run, not per step or block

    def positions(self, text_len: int) -> P:
        if text_len not in self._pe:
            self._pe[text_len] = self.dit.positions(text_ids(text_len, 1).to(self.device), self.img_ids)
        return self._pe[text_len]

    def tokens(self, z: torch.Tensor) -> torch.Tensor:
        """[B, 16, h, w] model-space latent -> [B, N, 64]: target tokens, then the references'."""
        img = pack(pad_to_patches(z))
        if not self.refs:
            return img
        return torch.cat([img, self.reference_batch(img.shape[0])], dim=1)

    def reference_batch(self, B: int) -> torch.Tensor:
        """The references' tokens [B, N_ref, 64], each reference's batch of 1 (or B) broadcast, joined once."""
        if B not in self._joined:
            parts = []
            for r in self.refs:
                if B % r.shape[0]:
                    raise InputError(f"a reference latent of batch {r.shape[0]} does not divide the batch of {B}")
                parts.append(r.repeat_interleave(B // r.shape[0], dim=0))
            self._joined[B] = torch.cat(parts, dim=1)
        return self._joined[B]

    def predict(self, img: torch.Tensor, t: torch.Tensor, txt: torch.Tensor, pooled: torch.Tensor,
                guidance: torch.Tensor | None, blocks: BlockRunner = PLAIN) -> torch.Tensor:
        """Packed tokens in, the target tokens' velocity [B, n_target, 64] (float32) out."""
        if not self.dit.capabilities.block_patches and not blocks.is_plain():
            self.dit.capabilities.require("block_patches")  # the backend's own words
        pe = self.positions(txt.shape[1])
        return self.dit.token_forward(img, txt, t, pooled, guidance, pe, blocks)[:, :self.n_target].float()

    def __call__(self, z: torch.Tensor, sigma: float | torch.Tensor, txt: torch.Tensor, pooled: torch.Tensor,
                 guidance: float | torch.Tensor | None, blocks: BlockRunner = PLAIN) -> torch.Tensor:
        """Model-space latent [B, 16, h, w] at noise level sigma -> velocity [B, 16, h, w] (float32)."""
        B = z.shape[0]
        t = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(B).to(self.device)
        g = None if guidance is None else \
            torch.as_tensor(guidance, dtype=torch.float32).reshape(-1).expand(B).to(self.device)
        v = self.predict(self.tokens(z), t, txt, pooled, g, blocks)
        hp, wp = self.h + self.h % 2, self.w + self.w % 2  # padded latent size
        return unpack(v, hp, wp)[:, :, :self.h, :self.w]
