"""T5 v1.1 XXL encoder (FLUX's `t5xxl`): a pre-norm transformer with relative position buckets and a gated-GELU FF.

FLUX feeds it 512 padded tokens with no attention mask and uses the final-normed states as the DiT's `txt`.
Parameter names follow transformers' T5EncoderModel, the layout of t5xxl_fp16.safetensors, of ComfyUI's
t5xxl_fp8_e4m3fn_scaled.safetensors (dequantised by `Checkpoint.read`) and of the diffusers `text_encoder_2/` folder.
Unlike most transformers, T5 does not scale its attention scores by 1/sqrt(d): that factor is folded into its init.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..weights.checkpoint import Checkpoint, count_indexed, resolve_model_path
from ..weights.loading import Plan, Source, load_plan
from .clip import check_ids, find_prefix, hf_config

log = logging.getLogger(__name__)


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    heads: int = 64
    d_ff: int = 10240
    layers: int = 24
    buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6

    @staticmethod
    def full() -> "T5Config":
        return T5Config()

    @staticmethod
    def tiny() -> "T5Config":
        return T5Config(d_model=64, d_kv=16, heads=4, d_ff=128, layers=2)

    def hf_config(self) -> dict:
        """This config as transformers' T5Config json (what a diffusers `text_encoder_2/config.json` holds)."""
        return {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": self.vocab_size,
                "d_model": self.d_model, "d_kv": self.d_kv, "num_heads": self.heads, "d_ff": self.d_ff,
                "num_layers": self.layers, "relative_attention_num_buckets": self.buckets,
                "relative_attention_max_distance": self.max_distance, "layer_norm_epsilon": self.eps,
                "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
                "tie_word_embeddings": False, "dropout_rate": 0.1, "torch_dtype": "float16"}


def to_residual(proj: nn.Linear, h: torch.Tensor) -> torch.Tensor:
    """`proj(h)` as an fp32 update of the residual stream.

    T5 v1.1's residual stream and feed-forward outputs outgrow fp16's 65504 on ordinary prompts (transformers keeps
    `wo` in fp32 and clamps infinities for this reason). We keep the residual stream in fp32 and, for fp16 weights,
    run the two projections that write into it (attention `o`, FF `wo`) in fp32, upcasting the weight per call: one
    layer's worth of extra memory, not a second copy of the model, and exact where clamping would change the result.
    bf16 shares fp32's exponent range and runs in its own dtype.
    """
    w = proj.weight
    if w.dtype == torch.float16:
        return F.linear(h.float(), w.float())
    return F.linear(h.to(w.dtype), w).float()


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction, no bias; statistics in fp32, result in the weight's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x).to(self.weight.dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.heads = cfg.heads
        inner = cfg.heads * cfg.d_kv
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_bias:  # only block 0 owns the table; every block adds the same bias
            self.relative_attention_bias = nn.Embedding(cfg.buckets, cfg.heads)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        # [B, L, H*Dk] -> [B, H, L, Dk]
        q, k, v = (p(x).view(B, L, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # no 1/sqrt(d): see module doc
        return to_residual(self.o, o.transpose(1, 2).reshape(B, L, -1))


class GatedFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The product of the two branches is the first value to leave fp16's range: form it in fp32.
        h = F.gelu(self.wi_0(x).float(), approximate="tanh") * self.wi_1(x).float()  # [B, L, d_ff]
        return to_residual(self.wo, h)


class AttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.SelfAttention = SelfAttention(cfg, has_bias)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class FFLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = GatedFF(cfg)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class Block(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([AttentionLayer(cfg, has_bias), FFLayer(cfg)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.layer[1](self.layer[0](x, bias))


def relative_buckets(length: int, buckets: int, max_distance: int, device: torch.device) -> torch.Tensor:
    """Bidirectional T5 bucket of every (query i, key j) pair: `[L, L]` int64.

    Half of the buckets hold keys before the query, half those after; within a half, offsets below a quarter of the
    buckets get one bucket each and larger ones share log-spaced buckets up to `max_distance`, beyond which all
    offsets share the last bucket.
    """
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]  # key minus query, [L, L]
    half = buckets // 2
    exact = half // 2
    n = rel.abs()
    log_bucket = exact + (torch.log(n.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                          * (half - exact)).long()
    bucket = torch.where(n < exact, n, log_bucket.clamp(max=half - 1))
    return bucket + (rel > 0).long() * half


class T5Encoder(nn.Module):
    """transformers' T5EncoderModel (v1.1, gated GELU), same parameter names, no buffers."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = nn.ModuleDict({"block": nn.ModuleList(Block(cfg, i == 0) for i in range(cfg.layers)),
                                      "final_layer_norm": RMSNorm(cfg.d_model, cfg.eps)})

    def position_bias(self, length: int, dtype: torch.dtype) -> torch.Tensor:
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        b = relative_buckets(length, self.config.buckets, self.config.max_distance, table.weight.device)
        return table(b).permute(2, 0, 1).unsqueeze(0).to(dtype)  # [L, L, H] -> [1, H, L, L]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`input_ids [B, L]` -> final-normed states `[B, L, d_model]` in the weights' dtype; no attention mask."""
        check_ids(input_ids, self.config.vocab_size, None, "T5")
        dtype = self.shared.weight.dtype
        x = self.shared(input_ids).float()  # the residual stream stays fp32: see to_residual
        bias = self.position_bias(input_ids.shape[1], dtype)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


# ---- loading ----

T5_EXPECTED = ("t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn_scaled.safetensors (transformers T5EncoderModel layout) "
               "or a diffusers text_encoder_2/ folder")
ATTN0 = "encoder.block.0.layer.0.SelfAttention."


def t5_config_and_plan(ckpt: Checkpoint) -> tuple[T5Config, Plan]:
    """Config from the file's shapes (heads from the bias table, d_kv from q) and where each parameter comes from."""
    p = find_prefix(ckpt, ATTN0 + "q.weight", "a T5 encoder", T5_EXPECTED)
    emb = next((p + k for k in ("shared.weight", "encoder.embed_tokens.weight") if p + k in ckpt), None)
    table = p + ATTN0 + "relative_attention_bias.weight"
    wi_0 = p + "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"
    for key, why in ((emb, "no token embedding (shared.weight or encoder.embed_tokens.weight)"),
                     (table, "no relative_attention_bias in block 0"),
                     (wi_0, "no gated feed-forward (wi_0): T5 v1.0 and other non-gated T5s are not supported")):
        if key is None or key not in ckpt:
            raise CheckpointError(ckpt.path, f"T5 checkpoint with {why}", T5_EXPECTED)
    if p + "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in ckpt:
        raise CheckpointError(ckpt.path, "UMT5 (a position bias in every block) is not supported", T5_EXPECTED)
    buckets, heads = ckpt.dims(table, 2)
    inner, d_model = ckpt.dims(p + ATTN0 + "q.weight", 2)
    if inner % heads:
        raise CheckpointError(ckpt.path, f"q projection of width {inner} does not split into {heads} heads")
    hf = hf_config(ckpt)
    cfg = T5Config(vocab_size=ckpt.dims(emb, 2)[0], d_model=d_model, d_kv=inner // heads, heads=heads,
                   d_ff=ckpt.dims(wi_0, 2)[0], buckets=buckets,
                   layers=count_indexed(ckpt.weight_keys(), re.escape(p) + r"encoder\.block\.(\d+)\."),
                   max_distance=int(hf.get("relative_attention_max_distance", 128)),
                   eps=float(hf.get("layer_norm_epsilon", 1e-6)))
    with torch.device("meta"):
        names = [n for n, _ in T5Encoder(cfg).named_parameters()]
    return cfg, {n: Source.of(emb if n == "shared.weight" else p + n) for n in names}


def load_t5xxl(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> T5Encoder:
    """Load a T5 v1.1 encoder: fp16/bf16/fp32 single file, ComfyUI fp8_scaled file, or diffusers text_encoder_2/.

    Tensors stream one at a time; fp8 weights are dequantised with their per-layer scales on the way in.
    Decoder tensors of a full T5 file are ignored.
    """
    ckpt = Checkpoint(resolve_model_path(path, "text_encoder_2"))
    cfg, plan = t5_config_and_plan(ckpt)
    with torch.device("meta"):
        model = T5Encoder(cfg)
    log.info("loading T5 encoder (%d layers, width %d%s) from %s", cfg.layers, cfg.d_model,
             ", fp8 scaled" if ckpt.is_quantized else "", ckpt.path)
    return load_plan(model, plan, ckpt, what="T5-XXL encoder", device=device, dtype=dtype)
