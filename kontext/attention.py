"""Attention backend: PyTorch's scaled_dot_product_attention (cuDNN / flash / memory-efficient on GPU)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .rope import Positions, apply_rope


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: Positions) -> torch.Tensor:
    """q, k, v [B, H, N, D] -> [B, N, H*D], with RoPE on q and k, full (unmasked) attention."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    x = F.scaled_dot_product_attention(q, k, v)
    return x.transpose(1, 2).flatten(2)  # [B, N, H*D]
