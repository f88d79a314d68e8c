"""CLIP ViT-L/14 text encoder (FLUX's `clip_l`): a causal, pre-norm transformer over 77 BPE tokens.

FLUX uses its pooled vector (the final-normed state at the first end-of-text token) as the DiT's `y`. Parameter names
follow transformers' CLIPTextModel because that is how clip_l.safetensors and the diffusers `text_encoder/` folder
store them, so loading is a one-to-one copy.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, InputError
from ..weights.checkpoint import Checkpoint, count_indexed, resolve_model_path
from ..weights.identify import describe
from ..weights.loading import Plan, Source, load_plan

log = logging.getLogger(__name__)

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI's sigmoid approximation, used by ViT-L/14
    "gelu": F.gelu,
}


@dataclass
class CLIPConfig:
    vocab_size: int = 49408
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    positions: int = 77
    act: str = "quick_gelu"
    eps: float = 1e-5
    eos_id: int = 49407  # <|endoftext|>, also the largest id of the BPE vocabulary

    @staticmethod
    def full() -> "CLIPConfig":
        return CLIPConfig()

    @staticmethod
    def tiny() -> "CLIPConfig":
        return CLIPConfig(hidden=64, layers=2, heads=2, intermediate=128)

    def hf_config(self) -> dict:
        """This config as transformers' CLIPTextConfig json (what a diffusers `text_encoder/config.json` holds)."""
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": self.vocab_size,
                "hidden_size": self.hidden, "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
                "intermediate_size": self.intermediate, "max_position_embeddings": self.positions,
                "hidden_act": self.act, "layer_norm_eps": self.eps, "projection_dim": 768,
                # eos 2 is what the released configs say (transformers then pools at argmax(input_ids), which is the
                # first 49407 with CLIP's tokenizer); we always pool at the first `eos_id`.
                "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "torch_dtype": "float16"}


class Attention(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(cfg.hidden, cfg.hidden) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        # [B, L, D] -> [B, H, L, D/H]
        q, k, v = (p(x).view(B, L, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(o.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.act]
        self.fc1 = nn.Linear(cfg.hidden, cfg.intermediate)
        self.fc2 = nn.Linear(cfg.intermediate, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden, eps=cfg.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPText(nn.Module):
    """transformers' CLIPTextModel, same parameter names; positions are computed, not stored (no buffers)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        if cfg.act not in ACTIVATIONS or cfg.hidden % cfg.heads:
            raise ValueError(f"unsupported CLIP config {cfg}")
        self.config = cfg
        tm = self.text_model = nn.Module()
        tm.embeddings = nn.ModuleDict({"token_embedding": nn.Embedding(cfg.vocab_size, cfg.hidden),
                                       "position_embedding": nn.Embedding(cfg.positions, cfg.hidden)})
        tm.encoder = nn.ModuleDict({"layers": nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))})
        tm.final_layer_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)

    def forward(self, input_ids: torch.Tensor, hidden_layer: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
        """`input_ids [B, L<=77]` -> (hidden `[B, L, D]`, pooled `[B, D]`).

        `hidden` is the output of layer `hidden_layer` (Python indexing over the layers): the last layer's after the
        final layer norm (transformers' `last_hidden_state`, the default), an earlier one as is (transformers'
        `hidden_states[i + 1]`, e.g. -2 for "clip skip"). `pooled` is always the final-normed last layer at the
        first end-of-text token, or at the last position of a row that has none.
        """
        cfg, tm = self.config, self.text_model
        check_ids(input_ids, cfg.vocab_size, cfg.positions, "CLIP")
        n = len(tm.encoder.layers)
        if not -n <= hidden_layer < n:
            raise InputError(f"hidden_layer {hidden_layer} is out of range for a CLIP with {n} layers")
        B, L = input_ids.shape
        emb = tm.embeddings
        x = emb.token_embedding(input_ids) + emb.position_embedding.weight[:L]  # [B, L, D]
        hidden = None
        for i, layer in enumerate(tm.encoder.layers):
            x = layer(x)
            if i == hidden_layer % n:
                hidden = x
        x = tm.final_layer_norm(x)
        if hidden_layer % n == n - 1:
            hidden = x
        is_eos = input_ids == cfg.eos_id
        # argmax returns the first maximum, i.e. the first end token (the padding after it is also 49407).
        where = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), L - 1)
        pooled = x[torch.arange(B, device=x.device), where]  # [B, D]
        return hidden, pooled


def check_ids(ids: torch.Tensor, vocab: int, max_len: int | None, what: str) -> None:
    """Token ids must be an integer [B, L] tensor within the vocabulary (an embedding lookup would crash otherwise)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.shape[1] == 0:
        raise InputError(f"{what} expects integer token ids of shape [batch, length], got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)} {list(getattr(ids, 'shape', []))}")
    if max_len is not None and ids.shape[1] > max_len:
        raise InputError(f"{what} takes at most {max_len} tokens, got {ids.shape[1]}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise InputError(f"{what} token ids must lie in [0, {vocab}), got ids from {lo} to {hi}")


# ---- shared by the CLIP and T5 loaders ----

def find_prefix(ckpt: Checkpoint, marker: str, what: str, expected: str) -> str:
    """The prefix before `marker` in the file's keys ('' for a bare layout), or a clear error if it has none."""
    keys = ckpt.weight_keys()
    found = sorted({k[: -len(marker)] for k in keys if k.endswith(marker) and k[: -len(marker)][-1:] in ("", ".")})
    if not found:
        raise CheckpointError(ckpt.path, f"is not {what}: it looks like {describe(keys)}", expected)
    if len(found) > 1:
        raise CheckpointError(ckpt.path, f"holds several {what}s (prefixes {found})", f"exactly one {what}")
    return found[0]


def hf_config(ckpt: Checkpoint) -> dict:
    """The transformers config: a folder's config.json, else a `config` json in the file's metadata (tiny files)."""
    if ckpt.config:
        return ckpt.config
    try:
        cfg = json.loads(ckpt.metadata.get("config", "{}"))
    except ValueError:
        raise CheckpointError(ckpt.path, "its 'config' metadata is not valid JSON") from None
    return cfg if isinstance(cfg, dict) else {}


# ---- loading ----

CLIP_EXPECTED = "clip_l.safetensors (transformers CLIPTextModel layout) or a diffusers text_encoder/ folder"


def clip_config_and_plan(ckpt: Checkpoint) -> tuple[CLIPConfig, Plan]:
    """Config from the file's shapes (and config.json where present) and where each parameter comes from."""
    p = find_prefix(ckpt, "embeddings.token_embedding.weight", "a CLIP text encoder", CLIP_EXPECTED)
    vocab, hidden = ckpt.dims(p + "embeddings.token_embedding.weight", 2)
    fc1 = p + "encoder.layers.0.mlp.fc1.weight"
    pos = p + "embeddings.position_embedding.weight"
    if fc1 not in ckpt or pos not in ckpt:
        raise CheckpointError(ckpt.path, f"CLIP text encoder without '{fc1 if fc1 not in ckpt else pos}'",
                              CLIP_EXPECTED)
    hf = hf_config(ckpt)
    # Real CLIP text towers all use 64-wide heads (ViT-L 12, ViT-H 16, bigG 20); tiny files say so in their config.
    heads = int(hf.get("num_attention_heads", max(1, hidden // 64)))
    eos = int(hf.get("eos_token_id", 2))
    cfg = CLIPConfig(vocab_size=vocab, hidden=hidden, heads=heads, intermediate=ckpt.dims(fc1, 2)[0],
                     layers=count_indexed(ckpt.weight_keys(), re.escape(p) + r"encoder\.layers\.(\d+)\."),
                     positions=ckpt.dims(pos, 2)[0], act=str(hf.get("hidden_act", "quick_gelu")),
                     eps=float(hf.get("layer_norm_eps", 1e-5)),
                     eos_id=eos if eos != 2 else vocab - 1)  # legacy eos 2 means "the largest id": <|endoftext|>
    if cfg.act not in ACTIVATIONS or hidden % heads:
        raise CheckpointError(ckpt.path, f"unsupported CLIP config: activation {cfg.act!r}, {heads} heads for "
                                         f"width {hidden}", "CLIP ViT-L/14 text (quick_gelu)")
    with torch.device("meta"):
        names = [n for n, _ in CLIPText(cfg).named_parameters()]
    # Our names all start with 'text_model.'; the file's start with its own prefix (often the same, or '').
    return cfg, {n: Source.of(p + n.removeprefix("text_model.")) for n in names}


def load_clip_l(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> CLIPText:
    """Load clip_l.safetensors (with or without the 'text_model.' prefix) or a diffusers `text_encoder/` folder.

    Extra tensors of some releases (text_projection.weight, logit_scale, position_ids) are ignored.
    """
    ckpt = Checkpoint(resolve_model_path(path, "text_encoder"))
    cfg, plan = clip_config_and_plan(ckpt)
    with torch.device("meta"):
        model = CLIPText(cfg)
    log.info("loading CLIP text encoder (%d layers, width %d) from %s", cfg.layers, cfg.hidden, ckpt.path)
    return load_plan(model, plan, ckpt, what="CLIP-L text encoder", device=device, dtype=dtype)
