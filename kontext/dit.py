"""The FLUX.1 (Kontext) Diffusion Transformer, with BFL's forward convention.

Reference images are just more image tokens: the caller appends their packed latents after the target tokens and gives
them ids with a non-zero index, so the model needs no special path for them; it predicts every image token and the
caller keeps the first (target) ones.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import FluxConfig
from .layers import DoubleStreamBlock, LastLayer, MLPEmbedder, SingleStreamBlock, timestep_embedding
from .rope import rope_cos_sin


class FluxDiT(nn.Module):
    def __init__(self, config: FluxConfig):
        super().__init__()
        c = self.config = config
        self.img_in = nn.Linear(c.in_channels, c.hidden_size)
        self.time_in = MLPEmbedder(256, c.hidden_size)
        self.vector_in = MLPEmbedder(c.vec_in_dim, c.hidden_size)
        self.guidance_in = MLPEmbedder(256, c.hidden_size) if c.guidance_embed else None
        self.txt_in = nn.Linear(c.context_in_dim, c.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(c.hidden_size, c.num_heads, c.mlp_hidden, c.qkv_bias) for _ in range(c.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(c.hidden_size, c.num_heads, c.mlp_hidden) for _ in range(c.depth_single_blocks))
        self.final_layer = LastLayer(c.hidden_size, c.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.img_in.weight.device

    def conditioning_vector(self, timesteps: torch.Tensor, y: torch.Tensor,
                            guidance: torch.Tensor | None) -> torch.Tensor:
        """vec [B, hidden] from the timestep, the guidance scalar and the CLIP pooled vector."""
        vec = self.time_in(timestep_embedding(timesteps, 256).to(self.dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this model embeds guidance: pass a guidance value (2.5 is Kontext's default)")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(self.dtype))
        return vec + self.vector_in(y.to(self.dtype))

    def forward(self, img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor, txt_ids: torch.Tensor,
                timesteps: torch.Tensor, y: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """img [B, N, 64] packed tokens (target, then references), ids [B, *, 3], txt [B, L, ctx], y [B, vec],
        timesteps [B] in [0, 1], guidance [B] -> velocity prediction [B, N, 64] for every image token."""
        if img.dim() != 3 or txt.dim() != 3:
            raise ValueError(f"img and txt must be [B, N, C]; got {tuple(img.shape)} and {tuple(txt.shape)}")
        dtype = self.dtype
        vec = self.conditioning_vector(timesteps, y, guidance)
        img = self.img_in(img.to(dtype))
        txt = self.txt_in(txt.to(dtype))
        cos, sin = rope_cos_sin(torch.cat((txt_ids, img_ids), dim=1), self.config.axes_dim, self.config.theta)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, cos, sin)
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = block(x, vec, cos, sin)
        return self.final_layer(x[:, txt.shape[1]:], vec)
