"""The FLUX.1 (Kontext) Diffusion Transformer, with BFL's forward convention.

Reference images are just more image tokens: the caller appends their packed latents after the target tokens and gives
them ids with a non-zero index, so the model needs no special path for them; it predicts every image token and the
caller keeps the first (target) ones (`kontext.denoiser.Denoiser` does all of that once per run).

The compute dtype is stated when the model is built, not read off a weight: weights may be stored in another format
(fp8, see `kontext.ops`) or live elsewhere (offloaded, streamed). Activations run in `compute_dtype` on the device of
the inputs.
"""
from __future__ import annotations

import torch
from torch import nn

from .backend import Capabilities, register
from .config import FluxConfig
from .layers import DoubleStreamBlock, LastLayer, MLPEmbedder, SingleStreamBlock, timestep_embedding
from .ops import make_linear
from .rope import Positions, positions

COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class BlockRunner:
    """How the blocks are run: plainly here; a host overrides it to wrap, replace or feed blocks (ComfyUI's block
    patches and ControlNet residuals, an offload policy that prefetches the next block's weights)."""

    def is_plain(self) -> bool:
        """True when running the blocks this way changes no number (a backend that fuses every block, such as
        a TensorRT engine, may then run in its place)."""
        return True

    def double(self, i: int, block: DoubleStreamBlock, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor,
               pe: Positions) -> tuple[torch.Tensor, torch.Tensor]:
        return block(img, txt, vec, pe)

    def single(self, i: int, block: SingleStreamBlock, x: torch.Tensor, vec: torch.Tensor, pe: Positions,
               n_txt: int) -> torch.Tensor:
        """x is the joint [txt, img] sequence; its first n_txt tokens are text."""
        return block(x, vec, pe)


PLAIN = BlockRunner()


class FluxDiT(nn.Module):
    """The PyTorch DiT: a `kontext.backend.DiTBackend` that can do everything the pack offers (LoRA, block patches,
    offload, compile)."""

    capabilities = Capabilities()

    def __init__(self, config: FluxConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute dtype {dtype} is not one of {COMPUTE_DTYPES}")
        c = self.config = config
        self.compute_dtype = dtype
        self.img_in = make_linear(c.in_channels, c.hidden_size)
        self.time_in = MLPEmbedder(256, c.hidden_size)
        self.vector_in = MLPEmbedder(c.vec_in_dim, c.hidden_size)
        self.guidance_in = MLPEmbedder(256, c.hidden_size) if c.guidance_embed else None
        self.txt_in = make_linear(c.context_in_dim, c.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(c.hidden_size, c.num_heads, c.mlp_hidden, c.qkv_bias) for _ in range(c.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(c.hidden_size, c.num_heads, c.mlp_hidden) for _ in range(c.depth_single_blocks))
        self.final_layer = LastLayer(c.hidden_size, c.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    def positions(self, txt_ids: torch.Tensor, img_ids: torch.Tensor) -> Positions:
        """RoPE tables for the joint [text, image] sequence; build once per run and pass to `forward(pe=...)`."""
        return positions(torch.cat((txt_ids, img_ids), dim=1), self.config.axes_dim, self.config.theta)

    def conditioning_vector(self, timesteps: torch.Tensor, y: torch.Tensor,
                            guidance: torch.Tensor | None) -> torch.Tensor:
        """vec [B, hidden] from the timestep, the guidance scalar and the CLIP pooled vector."""
        dtype = self.compute_dtype
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this model embeds guidance: pass a guidance value (2.5 is Kontext's default)")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        return vec + self.vector_in(y.to(dtype))

    def token_forward(self, img: torch.Tensor, txt: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor,
                      guidance: torch.Tensor | None, pe: Positions, blocks: BlockRunner = PLAIN) -> torch.Tensor:
        """The backend's token forward (see kontext.backend.DiTBackend): FluxDiT's own forward, named by its class,
        so a host subclass or wrapper that gives the module another call signature does not change it."""
        return FluxDiT.forward(self, img, None, txt, None, timesteps, y, guidance, pe=pe, blocks=blocks)

    def forward(self, img: torch.Tensor, img_ids: torch.Tensor | None, txt: torch.Tensor,
                txt_ids: torch.Tensor | None, timesteps: torch.Tensor, y: torch.Tensor,
                guidance: torch.Tensor | None = None, pe: Positions | None = None,
                blocks: BlockRunner = PLAIN) -> torch.Tensor:
        """img [B, N, 64] packed tokens (target, then references), ids [B, *, 3], txt [B, L, ctx], y [B, vec],
        timesteps [B] in [0, 1], guidance [B] -> velocity prediction [B, N, 64] for every image token.

        `pe`, the RoPE tables of `positions(txt_ids, img_ids)`, replaces the ids when given (the per-step path);
        `blocks` runs each block (see BlockRunner)."""
        if img.dim() != 3 or txt.dim() != 3:
            raise ValueError(f"img and txt must be [B, N, C]; got {tuple(img.shape)} and {tuple(txt.shape)}")
        if pe is None:
            if img_ids is None or txt_ids is None:
                raise ValueError("pass the token ids (img_ids, txt_ids) or their precomputed positions (pe)")
            pe = self.positions(txt_ids, img_ids)
        dtype = self.compute_dtype
        vec = self.conditioning_vector(timesteps, y, guidance)
        img = self.img_in(img.to(dtype))
        txt = self.txt_in(txt.to(dtype))
        for i, block in enumerate(self.double_blocks):
            img, txt = blocks.double(i, block, img, txt, vec, pe)
        x = torch.cat((txt, img), dim=1)
        for i, block in enumerate(self.single_blocks):
            x = blocks.single(i, block, x, vec, pe, txt.shape[1])
        return self.final_layer(x[:, txt.shape[1]:], vec)


register("torch", FluxDiT.capabilities, None)  # the built-in backend: load_dit loads it
