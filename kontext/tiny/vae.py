"""The tiny random Flux VAE in BFL's `ae.safetensors` layout and as a diffusers `vae/` folder."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..vae import AutoEncoder, VAEConfig, diffusers_name
from .io import save


def tiny_state_dict(seed: int = 0, cfg: VAEConfig | None = None) -> dict[str, torch.Tensor]:
    """Deterministic random weights with BFL names, scaled so that activations stay O(1) through the network."""
    with torch.device("meta"):
        model = AutoEncoder(cfg or VAEConfig.tiny())
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in model.named_parameters():
        t = torch.randn(p.shape, generator=gen)
        if p.dim() == 4:  # conv: unit-variance outputs for unit-variance inputs
            t /= math.sqrt(p[0].numel())
        elif ".norm" in name and name.endswith(".weight"):
            t = 1.0 + 0.1 * t
        else:
            t *= 0.05
        sd[name] = t.contiguous()
    return sd


def write_tiny_vae(path: str | Path, seed: int = 0) -> Path:
    """A random VAEConfig.tiny() in the layout of BFL's ae.safetensors (fp32)."""
    return save(tiny_state_dict(seed), path, {"format": "pt", "kontext_tiny": "vae", "layout": "bfl", "seed": str(seed)})


def write_tiny_vae_diffusers(folder: str | Path, seed: int = 0) -> Path:
    """The same weights as write_tiny_vae(seed) as a diffusers `vae/` folder (config.json + safetensors)."""
    cfg, folder = VAEConfig.tiny(), Path(folder)
    levels = len(cfg.ch_mult)
    sd = {}
    for name, t in tiny_state_dict(seed, cfg).items():
        if ".attn_1." in name and t.dim() == 4:
            t = t.reshape(t.shape[0], t.shape[1])  # diffusers' attention projections are nn.Linear
        sd[diffusers_name(name, levels)] = t
    save(sd, folder / "diffusion_pytorch_model.safetensors",
         {"format": "pt", "kontext_tiny": "vae", "layout": "diffusers", "seed": str(seed)})
    config = {
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0", "act_fn": "silu",
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult], "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_ch, "latent_channels": cfg.z_channels,
        "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": cfg.scale_factor,
        "shift_factor": cfg.shift_factor, "latents_mean": None, "latents_std": None, "force_upcast": True,
        "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder
