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

# Linear layers quantised when a full-precision file is loaded or written as fp8 or fp4: every layer of the
# transformer blocks (99% of the weights). The embedders (img_in, txt_in, time_in, vector_in, guidance_in) and the
# final layer stay as stored: they are under 1% of the bytes, and they set the scale of everything downstream.
QUANTIZABLE = ("double_blocks.", "single_blocks.")
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


def diffusers_layers(cfg: FluxConfig) -> dict[str, tuple[str, tuple[int, int] | None, bool]]:
    """The one diffusers <-> BFL table of the linear layers: diffusers layer name -> (our layer, the rows of ours it
    fills (None: all), whether its halves are swapped), as comfy.utils.flux_to_diffusers maps them. The checkpoint
    plan (`diffusers_plan`) and the LoRA key maps (kontext.lora.formats) are derived from it."""
    h, out = cfg.hidden_size, {}
    thirds = [(i * h, (i + 1) * h) for i in range(3)]
    for i in range(cfg.depth):
        t, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for x, rows in zip("qkv", thirds):
            out[f"{t}.attn.to_{x}"] = (f"{d}.img_attn.qkv", rows, False)
            out[f"{t}.attn.add_{x}_proj"] = (f"{d}.txt_attn.qkv", rows, False)
        for name, ours in (("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                           ("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
                           ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                           ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2")):
            out[f"{t}.{name}"] = (f"{d}.{ours}", None, False)
    for i in range(cfg.depth_single_blocks):
        t, s = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for x, rows in zip("qkv", thirds):
            out[f"{t}.attn.to_{x}"] = (f"{s}.linear1", rows, False)
        out[f"{t}.proj_mlp"] = (f"{s}.linear1", (3 * h, 3 * h + cfg.mlp_hidden), False)
        out[f"{t}.proj_out"] = (f"{s}.linear2", None, False)
        out[f"{t}.norm.linear"] = (f"{s}.modulation.lin", None, False)
    top = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
           **{f"time_text_embed.{name}.linear_{n}": f"{ours}.{layer}"
              for name, ours in (("timestep_embedder", "time_in"), ("text_embedder", "vector_in"),
                                 ("guidance_embedder", "guidance_in")) if ours != "guidance_in" or cfg.guidance_embed
              for n, layer in ((1, "in_layer"), (2, "out_layer"))}}
    out.update({name: (ours, None, False) for name, ours in top.items()})
    out["norm_out.linear"] = ("final_layer.adaLN_modulation.1", None, True)
    return out


def diffusers_plan(cfg: FluxConfig, p: str) -> Plan:
    """Our parameter name -> diffusers tensor(s) for every parameter of FluxDiT(cfg): the linear layers from
    `diffusers_layers` (several diffusers layers filling one of ours are joined in row order), plus the norms."""
    groups: dict[str, list[str]] = {}
    swapped: dict[str, bool] = {}
    for theirs, (ours, _, swap) in diffusers_layers(cfg).items():
        groups.setdefault(ours, []).append(theirs)
        swapped[ours] = swap
    plan: Plan = {}
    for ours, srcs in groups.items():
        op = "cat" if len(srcs) > 1 else "swap_halves" if swapped[ours] else "copy"
        # diffusers' double-block q, k, v carry biases only in models with qkv_bias; every other layer has one.
        leaves = ("weight", "bias") if cfg.qkv_bias or not ours.endswith("attn.qkv") else ("weight",)
        for leaf in leaves:
            plan[f"{ours}.{leaf}"] = Source(tuple(f"{p}{s}.{leaf}" for s in srcs), op)
    norms = [(f"double_blocks.{i}.{ours}", f"transformer_blocks.{i}.attn.{theirs}") for i in range(cfg.depth)
             for ours, theirs in (("img_attn.norm.query_norm", "norm_q"), ("img_attn.norm.key_norm", "norm_k"),
                                  ("txt_attn.norm.query_norm", "norm_added_q"),
                                  ("txt_attn.norm.key_norm", "norm_added_k"))]
    norms += [(f"single_blocks.{i}.norm.{ours}", f"single_transformer_blocks.{i}.attn.{theirs}")
              for i in range(cfg.depth_single_blocks) for ours, theirs in (("query_norm", "norm_q"),
                                                                           ("key_norm", "norm_k"))]
    plan.update({f"{ours}.scale": Source.of(f"{p}{theirs}.weight") for ours, theirs in norms})
    return plan


def split_sizes(cfg: FluxConfig, n: int, total: int) -> list[int]:
    """Row sizes of the n diffusers tensors joined into one of ours (q, k, v [, mlp])."""
    return [cfg.hidden_size] * (n - 1) + [total - cfg.hidden_size * (n - 1)]
