"""Dataclass configs of the Flux DiT, with the full FLUX.1 Kontext [dev] size and a tiny size for tests."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass
class FluxConfig:
    in_channels: int = 64  # 16 latent channels x 2x2 patch
    out_channels: int = 64
    vec_in_dim: int = 768  # CLIP-L pooled width
    context_in_dim: int = 4096  # T5-XXL width
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, int, int] = (16, 56, 56)  # RoPE split of head_dim over (index, row, col)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    def __post_init__(self) -> None:
        self.axes_dim = tuple(self.axes_dim)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"RoPE axes {self.axes_dim} must sum to head_dim {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def kontext_dev(cls) -> "FluxConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "FluxConfig":
        return cls(vec_in_dim=64, context_in_dim=64, hidden_size=128, num_heads=2, depth=2, depth_single_blocks=2,
                   axes_dim=(8, 28, 28))

    @staticmethod
    def default_axes(head_dim: int) -> tuple[int, int, int]:
        """BFL's split of a head over (index, row, col): 1/8, 7/16, 7/16 (16, 56, 56 at head_dim 128)."""
        first = head_dim // 8
        rest = (head_dim - first) // 2
        return (first, rest, head_dim - first - rest)

    def to_json(self) -> str:
        return json.dumps(asdict(self))
