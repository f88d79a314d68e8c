"""The tiny random DiT in the three release layouts: BFL's bf16 file, ComfyUI's fp8_scaled file, a diffusers folder.

Each weight matrix is drawn so that it is exactly representable as fp8 (e4m3) times a power-of-two scale, so the
three layouts hold bit-identical weights and every layout can be compared with the others exactly.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..config import FluxConfig
from ..dit import FluxDiT
from ..flux_keys import diffusers_plan, split_sizes
from ..release import FOLDERS, TINY_DIT, TINY_DIT_DIFFUSERS, TINY_DIT_FP8
from .io import save, save_sharded

COMFY_PREFIX = "model.diffusion_model."  # ComfyUI's key prefix in its fp8_scaled checkpoints


def fp8_representable(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w8 in float8_e4m3fn, power-of-two fp32 scale) with w8.float() * scale as close to w as fp8 allows."""
    scale = 2.0 ** math.ceil(math.log2(max(w.abs().max().item(), 1e-12) / 448.0))
    return (w / scale).to(torch.float8_e4m3fn), torch.tensor(scale, dtype=torch.float32)


def tiny_dit_state(config: FluxConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bf16 weights for FluxDiT(config) with activations of a sane size (1/sqrt(fan_in) init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        names = [(n, p.shape) for n, p in FluxDiT(config).named_parameters()]
    state = {}
    for name, shape in names:
        if name.endswith(".scale"):  # RMSNorm gains around 1
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / math.sqrt(shape[1])
            w8, scale = fp8_representable(t)
            t = w8.float() * scale
        state[name] = t.to(torch.bfloat16)
    return state


def fp8_scaled_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's fp8_scaled layout: prefixed keys, fp8 matrices with `scale_weight`, a `scaled_fp8` marker."""
    # The marker sits under the model prefix, as in ComfyUI's own files (it looks up f"{prefix}scaled_fp8").
    out: dict[str, torch.Tensor] = {COMFY_PREFIX + "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for name, t in state.items():
        if t.dim() == 2:
            w8, scale = fp8_representable(t.float())
            stem = name[: -len(".weight")]
            out[COMFY_PREFIX + name] = w8
            out[COMFY_PREFIX + stem + ".scale_weight"] = scale
            out[COMFY_PREFIX + stem + ".scale_input"] = torch.tensor(1.0)
        else:
            out[COMFY_PREFIX + name] = t
    return out


def diffusers_state(state: dict[str, torch.Tensor], config: FluxConfig) -> dict[str, torch.Tensor]:
    """The same weights under diffusers' names (the inverse of the loader's key map)."""
    out = {}
    for ours, src in diffusers_plan(config, "").items():
        t = state[ours]
        if src.op == "cat":
            parts = t.split(split_sizes(config, len(src.keys), t.shape[0]), dim=0)
            out.update({k: p.contiguous() for k, p in zip(src.keys, parts)})
        elif src.op == "swap_halves":
            a, b = t.chunk(2, dim=0)
            out[src.keys[0]] = torch.cat([b, a]).contiguous()
        else:
            out[src.keys[0]] = t
    return out


def diffusers_config(config: FluxConfig) -> dict:
    """The `config.json` of a diffusers FluxTransformer2DModel of this size."""
    return {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.34.0", "patch_size": 1,
            "in_channels": config.in_channels, "out_channels": None, "num_layers": config.depth,
            "num_single_layers": config.depth_single_blocks, "attention_head_dim": config.head_dim,
            "num_attention_heads": config.num_heads, "joint_attention_dim": config.context_in_dim,
            "pooled_projection_dim": config.vec_in_dim, "guidance_embeds": config.guidance_embed,
            "axes_dims_rope": list(config.axes_dim)}


def write_tiny_dit(models: Path, seed: int = 0, config: FluxConfig | None = None) -> dict[str, Path]:
    """The tiny DiT in the three release layouts under `models/diffusion_models/`."""
    config = config or FluxConfig.tiny()
    folder = Path(models) / FOLDERS["dit"][0]
    state = tiny_dit_state(config, seed)
    meta = {"format": "pt", "kontext_config": config.to_json()}
    paths = {"dit": folder / TINY_DIT, "dit_fp8": folder / TINY_DIT_FP8, "dit_diffusers": folder / TINY_DIT_DIFFUSERS}
    save(state, paths["dit"], meta)
    save(fp8_scaled_state(state), paths["dit_fp8"], meta)
    save_sharded(diffusers_state(state, config), paths["dit_diffusers"], "diffusion_pytorch_model")
    (paths["dit_diffusers"] / "config.json").write_text(json.dumps(diffusers_config(config), indent=2))
    return paths
