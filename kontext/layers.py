"""Building blocks of the Flux DiT, with BFL's parameter names so a BFL checkpoint loads without renaming."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import attention


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10_000, time_factor: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of t in [0, 1] (scaled by 1000), laid out [cos | sin] as BFL does."""
    t = time_factor * t.float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16 sums of squares lose too much), then scale in the input dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return xf.to(x.dtype) * self.scale.to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


class Modulation(nn.Module):
    """Projects the conditioning vector to `n` (shift, scale, gate) triples of width `dim`."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.lin = nn.Linear(dim, 3 * n * dim)

    def forward(self, vec: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(3 * self.n, dim=-1)  # each [B, 1, dim]
        return [tuple(out[3 * i: 3 * i + 3]) for i in range(self.n)]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (1 + scale) * x + shift


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters, eps 1e-6 (BFL's `elementwise_affine=False`)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, joined in one attention over [txt, img] tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qkv_bias: bool):
        super().__init__()
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(dim, 2))
            setattr(self, f"{s}_attn", SelfAttention(dim, num_heads, qkv_bias))
            setattr(self, f"{s}_mlp", nn.Sequential(nn.Linear(dim, mlp_hidden), nn.GELU(approximate="tanh"),
                                                    nn.Linear(mlp_hidden, dim)))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (img_sh1, img_sc1, img_g1), (img_sh2, img_sc2, img_g2) = self.img_mod(vec)
        (txt_sh1, txt_sc1, txt_g1), (txt_sh2, txt_sc2, txt_g2) = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(layer_norm(img), img_sh1, img_sc1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(layer_norm(txt), txt_sh1, txt_sc1))
        # Text tokens come first in the joint sequence, matching the order of the ids.
        attn = attention(torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2), torch.cat((txt_v, img_v), 2),
                         cos, sin)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + img_g1 * self.img_attn.proj(img_attn)
        img = img + img_g2 * self.img_mlp(modulate(layer_norm(img), img_sh2, img_sc2))
        txt = txt + txt_g1 * self.txt_attn.proj(txt_attn)
        txt = txt + txt_g2 * self.txt_mlp(modulate(layer_norm(txt), txt_sh2, txt_sc2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One weight set over the joint sequence; attention and MLP run in parallel from one fused projection."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.dim, self.num_heads, self.mlp_hidden = dim, num_heads, mlp_hidden
        self.linear1 = nn.Linear(dim, dim * 3 + mlp_hidden)
        self.linear2 = nn.Linear(dim + mlp_hidden, dim)
        self.norm = QKNorm(dim // num_heads)
        self.modulation = Modulation(dim, 1)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ((shift, scale, gate),) = self.modulation(vec)
        qkv, mlp = self.linear1(modulate(layer_norm(x), shift, scale)).split([3 * self.dim, self.mlp_hidden], -1)
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((attention(q, k, v, cos, sin), F.gelu(mlp, approximate="tanh")), -1))
        return x + gate * out


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)
        return self.linear(modulate(layer_norm(x), shift[:, None], scale[:, None]))
