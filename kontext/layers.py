"""Building blocks of the Flux DiT, with BFL's parameter names so a BFL checkpoint loads without renaming."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import attention
from .ops import make_linear
from .rope import Positions


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
        self.in_layer = make_linear(in_dim, hidden)
        self.out_layer = make_linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16 sums of squares lose too much), then scale in the input dtype. The scale is
        # brought to the input (a memory manager may have left it in RAM): it has no host protocol, being tiny.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return xf.to(x.dtype) * self.scale.to(device=x.device, dtype=x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


@dataclass
class ModulationOut:
    """One (shift, scale, gate) triple, each [B, 1, dim]: x -> (1 + scale) * norm(x) + shift, residual += gate * f."""
    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


class Modulation(nn.Module):
    """Projects the conditioning vector to `n` ModulationOut triples of width `dim` (2 per double-stream stream,
    1 per single-stream block)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.lin = make_linear(dim, 3 * n * dim)

    def forward(self, vec: torch.Tensor) -> list[ModulationOut]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(3 * self.n, dim=-1)  # each [B, 1, dim]
        return [ModulationOut(*out[3 * i: 3 * i + 3]) for i in range(self.n)]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (1 + scale) * x + shift


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters, eps 1e-6 (BFL's `elementwise_affine=False`)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = make_linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = make_linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


class MLP(nn.Sequential):
    """hidden -> mlp_hidden -> hidden with tanh-GELU; a Sequential so the parameters are named 0.* and 2.* as BFL's."""

    def __init__(self, dim: int, mlp_hidden: int):
        super().__init__(make_linear(dim, mlp_hidden), nn.GELU(approximate="tanh"), make_linear(mlp_hidden, dim))


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, joined in one attention over [txt, img] tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qkv_bias: bool):
        super().__init__()
        self.img_mod = Modulation(dim, 2)
        self.img_attn = SelfAttention(dim, num_heads, qkv_bias)
        self.img_mlp = MLP(dim, mlp_hidden)
        self.txt_mod = Modulation(dim, 2)
        self.txt_attn = SelfAttention(dim, num_heads, qkv_bias)
        self.txt_mlp = MLP(dim, mlp_hidden)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor,
                pe: Positions) -> tuple[torch.Tensor, torch.Tensor]:
        img_mod1, img_mod2 = self.img_mod(vec)  # before attention, before the MLP
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(layer_norm(img), img_mod1.shift, img_mod1.scale))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(layer_norm(txt), txt_mod1.shift, txt_mod1.scale))
        # Text tokens come first in the joint sequence, matching the order of the ids.
        attn = attention(torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2), torch.cat((txt_v, img_v), 2),
                         pe)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * self.img_mlp(modulate(layer_norm(img), img_mod2.shift, img_mod2.scale))
        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * self.txt_mlp(modulate(layer_norm(txt), txt_mod2.shift, txt_mod2.scale))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One weight set over the joint sequence; attention and MLP run in parallel from one fused projection."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.dim, self.num_heads, self.mlp_hidden = dim, num_heads, mlp_hidden
        self.linear1 = make_linear(dim, dim * 3 + mlp_hidden)  # q, k, v and the MLP's input, fused
        self.linear2 = make_linear(dim + mlp_hidden, dim)  # attention output and MLP hidden, fused
        self.norm = QKNorm(dim // num_heads)
        self.modulation = Modulation(dim, 1)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, pe: Positions) -> torch.Tensor:
        (mod,) = self.modulation(vec)
        qkv, mlp = self.linear1(modulate(layer_norm(x), mod.shift, mod.scale)).split([3 * self.dim, self.mlp_hidden],
                                                                                    -1)
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((attention(q, k, v, pe), F.gelu(mlp, approximate="tanh")), -1))
        return x + mod.gate * out


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.linear = make_linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), make_linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)
        return self.linear(modulate(layer_norm(x), shift[:, None], scale[:, None]))
