"""Key maps of the Flux DiT's checkpoint layouts onto our (BFL-named) parameters, and config from tensor shapes.

Layouts: BFL's own names (the release file, also ComfyUI-prefixed and fp8-scaled), and diffusers' names (the
`transformer/` folder or a single file), where q, k, v (and the single blocks' MLP input) are separate tensors and the
final AdaLN stores (scale, shift) instead of (shift, scale).
"""
from __future__ import annotations

import json

from .config import FluxConfig
from .errors import CheckpointError
from .weights import Checkpoint, Plan, Source, count_indexed

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.")
BFL_MARKER = "double_blocks.0.img_attn.qkv.weight"
DIFFUSERS_MARKER = "transformer_blocks.0.attn.to_q.weight"


def detect(keys: list[str]) -> tuple[str, str] | None:
    """(layout, prefix) of a Flux DiT key set, or None if these are not Flux DiT keys."""
    for prefix in ("",) + PREFIXES:
        names = {k[len(prefix):] for k in keys if k.startswith(prefix)}
        if BFL_MARKER in names and "img_in.weight" in names:
            return "bfl", prefix
        if DIFFUSERS_MARKER in names and "x_embedder.weight" in names:
            return "diffusers", prefix
    return None


def config_from_shapes(ckpt: Checkpoint, layout: str, prefix: str) -> FluxConfig:
    """Read the architecture off the tensor shapes; RoPE axes from `kontext_config` metadata or BFL's default split."""
    keys = [k[len(prefix):] for k in ckpt.weight_keys() if k.startswith(prefix)]
    shape = lambda k: ckpt.dims(prefix + k, 1 if k == names["qn"] else 2)  # noqa: E731
    if layout == "bfl":
        names = dict(img="img_in.weight", out="final_layer.linear.weight", vec="vector_in.in_layer.weight",
                     txt="txt_in.weight", qn="double_blocks.0.img_attn.norm.query_norm.scale",
                     mlp="double_blocks.0.img_mlp.0.weight", guid="guidance_in.in_layer.weight",
                     bias="double_blocks.0.img_attn.qkv.bias")
        depth = count_indexed(keys, r"double_blocks\.(\d+)\.")
        single = count_indexed(keys, r"single_blocks\.(\d+)\.")
    else:
        names = dict(img="x_embedder.weight", out="proj_out.weight", vec="time_text_embed.text_embedder.linear_1.weight",
                     txt="context_embedder.weight", qn="transformer_blocks.0.attn.norm_q.weight",
                     mlp="transformer_blocks.0.ff.net.0.proj.weight",
                     guid="time_text_embed.guidance_embedder.linear_1.weight", bias="transformer_blocks.0.attn.to_q.bias")
        depth = count_indexed(keys, r"transformer_blocks\.(\d+)\.")
        single = count_indexed(keys, r"single_transformer_blocks\.(\d+)\.")
    missing = [n for k, n in names.items() if k not in ("guid", "bias") and n not in keys]
    if missing:
        raise CheckpointError(ckpt.path, f"is missing Flux DiT tensor '{prefix}{missing[0]}'", "a complete Flux DiT")
    hidden, in_channels = shape(names["img"])
    head_dim = shape(names["qn"])[0]
    if head_dim <= 0 or hidden % head_dim:
        raise CheckpointError(ckpt.path, f"QK-norm width {head_dim} does not divide hidden size {hidden}")
    axes = FluxConfig.default_axes(head_dim)
    meta = ckpt.metadata.get("kontext_config")
    if meta:
        try:
            axes = tuple(json.loads(meta)["axes_dim"])
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(ckpt.path, "metadata 'kontext_config' is not valid JSON with 'axes_dim'") from None
    elif ckpt.config.get("axes_dims_rope"):
        axes = tuple(ckpt.config["axes_dims_rope"])
    try:
        return FluxConfig(in_channels=in_channels, out_channels=shape(names["out"])[0], vec_in_dim=shape(names["vec"])[1],
                          context_in_dim=shape(names["txt"])[1], hidden_size=hidden,
                          mlp_ratio=shape(names["mlp"])[0] / hidden, num_heads=hidden // head_dim, depth=depth,
                          depth_single_blocks=single, axes_dim=axes, qkv_bias=names["bias"] in keys,
                          guidance_embed=names["guid"] in keys)
    except ValueError as exc:
        raise CheckpointError(ckpt.path, f"inconsistent Flux DiT shapes: {exc}") from None


def bfl_plan(model_keys: list[str], prefix: str) -> Plan:
    return {k: Source.of(prefix + k) for k in model_keys}


def _linear(dst: str, src: str, plan: Plan, p: str, op: str = "copy") -> None:
    for leaf in ("weight", "bias"):
        plan[f"{dst}.{leaf}"] = Source((f"{p}{src}.{leaf}",), op)


def _cat(dst: str, srcs: list[str], plan: Plan, p: str, bias: bool = True) -> None:
    for leaf in ("weight", "bias") if bias else ("weight",):
        plan[f"{dst}.{leaf}"] = Source(tuple(f"{p}{s}.{leaf}" for s in srcs), "cat")


def diffusers_plan(cfg: FluxConfig, p: str) -> Plan:
    """Our parameter name -> diffusers tensor(s) for every parameter of FluxDiT(cfg)."""
    plan: Plan = {}
    _linear("img_in", "x_embedder", plan, p)
    _linear("txt_in", "context_embedder", plan, p)
    emb = {"time_in": "timestep_embedder", "vector_in": "text_embedder", "guidance_in": "guidance_embedder"}
    for ours, theirs in emb.items():
        if ours == "guidance_in" and not cfg.guidance_embed:
            continue
        _linear(f"{ours}.in_layer", f"time_text_embed.{theirs}.linear_1", plan, p)
        _linear(f"{ours}.out_layer", f"time_text_embed.{theirs}.linear_2", plan, p)
    for i in range(cfg.depth):
        d, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
        _linear(f"{d}.img_mod.lin", f"{t}.norm1.linear", plan, p)
        _linear(f"{d}.txt_mod.lin", f"{t}.norm1_context.linear", plan, p)
        _cat(f"{d}.img_attn.qkv", [f"{t}.attn.to_{x}" for x in "qkv"], plan, p, cfg.qkv_bias)
        _cat(f"{d}.txt_attn.qkv", [f"{t}.attn.add_{x}_proj" for x in "qkv"], plan, p, cfg.qkv_bias)
        plan[f"{d}.img_attn.norm.query_norm.scale"] = Source.of(f"{p}{t}.attn.norm_q.weight")
        plan[f"{d}.img_attn.norm.key_norm.scale"] = Source.of(f"{p}{t}.attn.norm_k.weight")
        plan[f"{d}.txt_attn.norm.query_norm.scale"] = Source.of(f"{p}{t}.attn.norm_added_q.weight")
        plan[f"{d}.txt_attn.norm.key_norm.scale"] = Source.of(f"{p}{t}.attn.norm_added_k.weight")
        _linear(f"{d}.img_attn.proj", f"{t}.attn.to_out.0", plan, p)
        _linear(f"{d}.txt_attn.proj", f"{t}.attn.to_add_out", plan, p)
        _linear(f"{d}.img_mlp.0", f"{t}.ff.net.0.proj", plan, p)
        _linear(f"{d}.img_mlp.2", f"{t}.ff.net.2", plan, p)
        _linear(f"{d}.txt_mlp.0", f"{t}.ff_context.net.0.proj", plan, p)
        _linear(f"{d}.txt_mlp.2", f"{t}.ff_context.net.2", plan, p)
    for i in range(cfg.depth_single_blocks):
        s, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        _cat(f"{s}.linear1", [f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v", f"{t}.proj_mlp"], plan, p)
        _linear(f"{s}.linear2", f"{t}.proj_out", plan, p)
        plan[f"{s}.norm.query_norm.scale"] = Source.of(f"{p}{t}.attn.norm_q.weight")
        plan[f"{s}.norm.key_norm.scale"] = Source.of(f"{p}{t}.attn.norm_k.weight")
        _linear(f"{s}.modulation.lin", f"{t}.norm.linear", plan, p)
    _linear("final_layer.linear", "proj_out", plan, p)
    _linear("final_layer.adaLN_modulation.1", "norm_out.linear", plan, p, op="swap_halves")
    return plan


def split_sizes(cfg: FluxConfig, n: int, total: int) -> list[int]:
    """Row sizes of the n diffusers tensors joined into one of ours (q, k, v [, mlp])."""
    return [cfg.hidden_size] * (n - 1) + [total - cfg.hidden_size * (n - 1)]
