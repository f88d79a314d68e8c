"""The tiny random text encoders, real vocabulary sizes: CLIP-L as clip_l.safetensors and a diffusers
`text_encoder/` folder; T5-XXL as t5xxl_fp16.safetensors, ComfyUI's fp8_scaled file and a diffusers `text_encoder_2/`.

Single files carry the transformers config as `config` metadata (the head count is not visible in the shapes).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..text.clip import CLIPConfig, CLIPText
from ..text.t5 import T5Config, T5Encoder
from .io import save, save_sharded


def tiny_clip_state(seed: int = 0, cfg: CLIPConfig | None = None) -> dict[str, torch.Tensor]:
    """Random fp32 weights under the release names: small embeddings, fan-in scaled linears, norms near 1."""
    cfg = cfg or CLIPConfig.tiny()
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        params = dict(CLIPText(cfg).named_parameters())
    out = {}
    for name, p in params.items():
        r = torch.randn(p.shape, generator=g)
        if "embedding" in name:
            t = r * 0.02
        elif "norm" in name:
            t = 1 + 0.05 * r if name.endswith("weight") else 0.02 * r
        else:
            t = r * p.shape[1] ** -0.5 if p.dim() == 2 else 0.02 * r
        out[name] = t
    return out


def write_tiny_clip_l(path: str | Path, seed: int = 0) -> Path:
    """A random tiny CLIP-L in the layout of clip_l.safetensors (fp16, real vocabulary size)."""
    cfg = CLIPConfig.tiny()
    sd = {k: v.half() for k, v in tiny_clip_state(seed, cfg).items()}
    return save(sd, path, {"config": json.dumps(cfg.hf_config())})


def write_tiny_clip_l_diffusers(folder: str | Path, seed: int = 0) -> Path:
    """The same tiny CLIP-L as a diffusers `text_encoder/` folder (config.json + model.safetensors)."""
    cfg, folder = CLIPConfig.tiny(), Path(folder)
    save({k: v.half() for k, v in tiny_clip_state(seed, cfg).items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(cfg.hf_config(), indent=2))
    return folder


def tiny_t5_state(seed: int = 0, cfg: T5Config | None = None) -> dict[str, torch.Tensor]:
    """Random fp32 weights under the release names, with T5's own init scales (unit embeddings, fan-in linears)."""
    cfg = cfg or T5Config.tiny()
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        params = dict(T5Encoder(cfg).named_parameters())
    std = {"q": (cfg.d_model * cfg.d_kv) ** -0.5, "k": cfg.d_model ** -0.5, "v": cfg.d_model ** -0.5,
           "o": (cfg.heads * cfg.d_kv) ** -0.5, "wi_0": cfg.d_model ** -0.5, "wi_1": cfg.d_model ** -0.5,
           "wo": cfg.d_ff ** -0.5, "shared": 1.0, "relative_attention_bias": 0.5}
    out = {}
    for name, p in params.items():
        r = torch.randn(p.shape, generator=g)
        out[name] = 1 + 0.05 * r if "layer_norm" in name else r * std[name.split(".")[-2]]
    return out


def write_tiny_t5xxl(path: str | Path, seed: int = 0) -> Path:
    """A random tiny T5 in the layout of t5xxl_fp16.safetensors (fp16, `shared.weight` only, real vocabulary)."""
    cfg = T5Config.tiny()
    return save({k: v.half() for k, v in tiny_t5_state(seed, cfg).items()}, path,
                {"config": json.dumps(cfg.hf_config())})


def write_tiny_t5xxl_fp8_scaled(path: str | Path, seed: int = 0) -> Path:
    """The same tiny T5 in ComfyUI's fp8_scaled layout: e4m3fn linear weights with an fp32 `scale_weight` each,
    a `scaled_fp8` marker, norms, bias table and embedding in fp16."""
    cfg = T5Config.tiny()
    sd: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for name, t in tiny_t5_state(seed, cfg).items():
        t = t.half().float()
        if name.startswith("encoder.block.") and t.dim() == 2 and "relative_attention_bias" not in name:
            scale = t.abs().max() / torch.finfo(torch.float8_e4m3fn).max
            sd[name] = (t / scale).to(torch.float8_e4m3fn)
            sd[name.removesuffix("weight") + "scale_weight"] = scale.float()
        else:
            sd[name] = t.half()
    return save(sd, path, {"config": json.dumps(cfg.hf_config())})


def write_tiny_t5xxl_diffusers(folder: str | Path, seed: int = 0, shards: int = 2) -> Path:
    """The same tiny T5 as a diffusers `text_encoder_2/` folder: config.json, fp16 shards and their index."""
    cfg, folder = T5Config.tiny(), Path(folder)
    save_sharded({k: v.half() for k, v in tiny_t5_state(seed, cfg).items()}, folder, "model", shards)
    (folder / "config.json").write_text(json.dumps(cfg.hf_config(), indent=2))
    return folder
