"""LoRA files of every supported layout read into patches on the tiny DiT, with the merged weights checked.

The reference is ComfyUI's arithmetic written out here, independently of kontext.lora.math: W' = W + strength *
(alpha / rank) * up @ down per row slice of a fused projection; a full delta adds strength * diff; DoRA is ComfyUI's
weight_decompose. One random LoRA is written in each layout (split q/k/v for diffusers names, swapped halves for
norm_out), so the layouts must also agree with each other. With COMFYUI_DIR set, ComfyUI's own LoRA code
(comfy.lora.load_lora, ModelPatcher.add_patches, calculate_weight) runs on the same files in its own Python.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from conftest import rel_err
from safetensors.torch import load_file, save_file

from kontext.config import FluxConfig
from kontext.errors import CheckpointError
from kontext.lora.formats import key_map, param_shapes, read_lora
from kontext.lora.math import apply_patches

CFG = FluxConfig.tiny()
H, MLP = CFG.hidden_size, CFG.mlp_hidden
SHAPES = param_shapes(CFG)
LAYERS = [k[: -len(".weight")] for k, s in SHAPES.items() if k.endswith(".weight") and len(s) == 2]
EPS = torch.finfo(torch.float32).eps
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")


@dataclass
class Spec:
    """One reference change in BFL terms: a LoRA (up, down, alpha, dora) and/or deltas, on `rows` or all rows."""
    layer: str
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    alpha: float | None = None
    dora: torch.Tensor | None = None
    diff: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None
    rows: tuple[int, int] | None = None


def specs(seed: int, layers=None, rank: int = 4, alpha: float | None = 2.0, dora=(), diff=(), diff_b=(),
          dora_axis: str = "out") -> list[Spec]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for layer in layers or LAYERS:
        o, i = SHAPES[layer + ".weight"]
        def r(*size: int) -> torch.Tensor:
            return torch.randn(*size, generator=g) * 0.1
        s = Spec(layer) if layer in diff else Spec(layer, r(o, rank), r(rank, i), alpha)
        if layer in diff:
            s.diff = r(o, i)
        if layer in dora:
            s.dora = 1 + r(o, 1) if dora_axis == "out" else 1 + r(1, i)
        if layer in diff_b:
            s.diff_b = r(o)
        out.append(s)
    return out


# ---- writers: the same specs in each layout ------------------------------------------------------------------

def _parts(name: str, s: Spec, up: str, down: str) -> dict[str, torch.Tensor]:
    sd = {}
    if s.up is not None:
        sd[name + up], sd[name + down] = s.up.clone(), s.down.clone()  # safetensors refuses shared storage
        if s.alpha is not None:
            sd[name + ".alpha"] = torch.tensor(s.alpha)
    for part, t in ((".dora_scale", s.dora), (".diff", s.diff), (".diff_b", s.diff_b)):
        if t is not None:
            sd[name + part] = t.clone()
    return sd


def write_bfl(specs_, prefix="diffusion_model.", up=".lora_up.weight", down=".lora_down.weight",
              underscore=False) -> dict[str, torch.Tensor]:
    sd = {}
    for s in specs_:
        assert s.rows is None
        sd.update(_parts(prefix + (s.layer.replace(".", "_") if underscore else s.layer), s, up, down))
    return sd


def diffusers_names(layer: str) -> list[tuple[str, tuple[int, int] | None, bool]]:
    """Our layer -> its diffusers pieces (name, rows, swapped), written out from diffusers' Flux transformer."""
    m = re.fullmatch(r"(double|single)_blocks\.(\d+)\.(.+)", layer)
    thirds = [(0, H), (H, 2 * H), (2 * H, 3 * H)]
    if m and m[1] == "double":
        t, rest = f"transformer_blocks.{m[2]}", m[3]
        if rest.endswith("attn.qkv"):
            names = ["to_q", "to_k", "to_v"] if rest.startswith("img") else ["add_q_proj", "add_k_proj", "add_v_proj"]
            return [(f"{t}.attn.{n}", rows, False) for n, rows in zip(names, thirds)]
        single = {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out", "img_mod.lin": "norm1.linear",
                  "txt_mod.lin": "norm1_context.linear", "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
                  "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2"}
        return [(f"{t}.{single[rest]}", None, False)]
    if m:
        t, rest = f"single_transformer_blocks.{m[2]}", m[3]
        if rest == "linear1":
            return [(f"{t}.attn.to_{x}", rows, False) for x, rows in zip("qkv", thirds)] + \
                [(f"{t}.proj_mlp", (3 * H, 3 * H + MLP), False)]
        return [(f"{t}.{ {'linear2': 'proj_out', 'modulation.lin': 'norm.linear'}[rest]}", None, False)]
    top = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
           "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
           "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
           "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
           "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
           "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
           "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2"}
    if layer == "final_layer.adaLN_modulation.1":
        return [("norm_out.linear", None, True)]
    return [(top[layer], None, False)]


def swap(t: torch.Tensor) -> torch.Tensor:
    shift, scale = t.chunk(2, 0)
    return torch.cat([scale, shift], 0)


def write_diffusers(specs_, prefix="transformer.", up=".lora_B.weight", down=".lora_A.weight",
                    underscore=False) -> dict[str, torch.Tensor]:
    """Fused layers split as diffusers' converters split them: the down copied, the up (and deltas) by rows."""
    sd = {}
    for s in specs_:
        for name, rows, swapped in diffusers_names(s.layer):
            a, b = rows or (0, SHAPES[s.layer + ".weight"][0])
            def cut(t, a=a, b=b, swapped=swapped):
                return None if t is None else (swap(t) if swapped else t[a:b])
            dora = s.dora if s.dora is None or s.dora.shape[0] == 1 else cut(s.dora)
            piece = Spec(s.layer, cut(s.up), s.down, s.alpha, dora, cut(s.diff), cut(s.diff_b))
            sd.update(_parts(prefix + (name.replace(".", "_") if underscore else name), piece, up, down))
    return sd


XLABS = {"img_attn.qkv": "qkv_lora1", "txt_attn.qkv": "qkv_lora2", "img_attn.proj": "proj_lora1",
         "txt_attn.proj": "proj_lora2", "linear1": "qkv_lora", "linear2": "proj_lora"}


def write_xlabs(specs_) -> dict[str, torch.Tensor]:
    sd = {}
    for s in specs_:
        block, rest = re.fullmatch(r"((?:double|single)_blocks\.\d+)\.(.+)", s.layer).groups()
        name = f"{block}.processor.{XLABS[rest]}"
        sd[name + ".down.weight"], sd[name + ".up.weight"] = s.down.clone(), s.up.clone()
    return sd


def xlabs_specs(seed: int) -> list[Spec]:
    layers = [la for la in LAYERS if la.split(".", 2)[-1] in XLABS]
    out = specs(seed, layers, alpha=None)
    for s in out:
        if s.layer.endswith("linear1"):  # XLabs' single-block LoRA is on the q, k, v rows only
            s.up, s.rows = s.up[: 3 * H], (0, 3 * H)
    return out


# ---- the reference arithmetic ----------------------------------------------------------------------------------

def base_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) * 0.05 for k, s in SHAPES.items()}


def reference(base: dict, specs_: list[Spec], strength: float) -> dict[str, torch.Tensor]:
    """ComfyUI's formulas, written out: the merged parameters the specs change."""
    out = {}
    for s in specs_:
        key = s.layer + ".weight"
        w = out.get(key, base[key]).clone()
        a, b = s.rows or (0, w.shape[0])
        old = w[a:b]
        if s.diff is not None:
            w[a:b] = old + strength * s.diff
        elif s.dora is None:
            w[a:b] = old + strength * ((s.alpha or s.down.shape[0]) / s.down.shape[0]) * (s.up @ s.down)
        else:
            new = old + ((s.alpha or s.down.shape[0]) / s.down.shape[0]) * (s.up @ s.down)
            norm = old.norm(dim=1, keepdim=True) if s.dora.shape[0] == b - a else new.norm(dim=0, keepdim=True)
            w[a:b] = old + strength * (new * (s.dora / (norm + EPS)) - old)
        out[key] = w
        if s.diff_b is not None:
            out[s.layer + ".bias"] = base[s.layer + ".bias"] + strength * s.diff_b
    return out


def merged(lora, base: dict, strength: float) -> dict[str, torch.Tensor]:
    """Our patches applied with kontext.lora.math, per parameter."""
    by_target: dict[str, list] = {}
    for p in lora.patches:
        by_target.setdefault(p.target, []).append(p)
    return {t: apply_patches(base[t], ps, strength) for t, ps in by_target.items()}


def assert_same(ours: dict, want: dict, tol: float = 1e-6) -> None:
    assert sorted(ours) == sorted(want)
    for k, w in want.items():
        assert rel_err(ours[k], w) < tol, k
        assert torch.allclose(ours[k], w, rtol=0, atol=tol), k


# ---- the layouts -----------------------------------------------------------------------------------------------

FULL = {"dora": ("double_blocks.0.img_mlp.0", "single_blocks.1.modulation.lin"),
        "diff": ("double_blocks.1.txt_attn.proj",), "diff_b": ("single_blocks.0.linear2", "img_in")}


def layouts(seed: int = 1) -> dict[str, tuple[dict, list[Spec], str]]:
    """name -> (file tensors, the specs they hold, the format read_lora must report)."""
    full = specs(seed, **FULL)
    no_alpha = specs(seed, alpha=None)
    split = specs(seed, dora=FULL["dora"], diff=FULL["diff"], diff_b=("double_blocks.0.img_attn.proj",))
    qkv = [Spec(f"single_blocks.{i}.linear1", s.up[: 3 * H], s.down, 3.0, rows=(0, 3 * H))
           for i, s in enumerate(specs(seed + 1, [f"single_blocks.{i}.linear1" for i in range(2)]))]
    return {
        "comfyui": (write_bfl(full), full, "comfyui"),
        "comfyui_lora_AB": (write_bfl(full, up=".lora_B.weight", down=".lora_A.weight"), full, "comfyui"),
        "comfyui_linear1_qkv": ({k.replace(".linear1.", ".linear1_qkv."): v for k, v in write_bfl(
            [replace(s, rows=None) for s in qkv]).items()}, qkv, "comfyui"),
        "bfl_bare": (write_bfl(full, prefix=""), full, "bfl"),
        "bfl_model_prefix": (write_bfl(full, prefix="model.diffusion_model."), full, "bfl"),
        "kohya": (write_bfl(full, prefix="lora_unet_", underscore=True), full, "kohya"),
        "fal": (write_bfl(no_alpha, prefix="base_model.model.", up=".lora_B.weight", down=".lora_A.weight"),
                no_alpha, "fal"),
        "diffusers": (write_diffusers(split), split, "diffusers"),
        "diffusers_bare_no_alpha": (write_diffusers(no_alpha, prefix=""), no_alpha, "diffusers"),
        "peft": (write_diffusers(split, prefix="base_model.model."), split, "peft"),
        "lycoris": (write_diffusers(split, prefix="lycoris_", up=".lora_up.weight", down=".lora_down.weight",
                                    underscore=True), split, "lycoris"),
        "onetrainer": (write_diffusers(split, prefix="lora_transformer_", up=".lora_up.weight",
                                       down=".lora_down.weight", underscore=True), split, "onetrainer"),
        "xlabs": (write_xlabs(xlabs_specs(seed)), xlabs_specs(seed), "xlabs"),
    }


LAYOUTS = layouts()


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_matches_comfyui_formula(name, tmp_path):
    sd, specs_, fmt = LAYOUTS[name]
    save_file(sd, tmp_path / "lora.safetensors")
    lora = read_lora(tmp_path / "lora.safetensors", CFG)
    assert lora.format == fmt and lora.unmatched == []
    assert {k for p in lora.patches for k in p.source_keys} == set(sd)  # every key is used
    base = base_weights()
    for strength in (1.0, 0.7):
        assert_same(merged(lora, base, strength), reference(base, specs_, strength))


def test_layouts_agree(tmp_path):
    """The same LoRA under ComfyUI, kohya, diffusers (q/k/v split, norm_out swapped) and OneTrainer names."""
    one = specs(5, dora=FULL["dora"])
    files = {"comfyui": write_bfl(one), "kohya": write_bfl(one, prefix="lora_unet_", underscore=True),
             "diffusers": write_diffusers(one), "onetrainer": write_diffusers(
                 one, prefix="lora_transformer_", up=".lora_up.weight", down=".lora_down.weight", underscore=True)}
    base = base_weights(3)
    results = {}
    for name, sd in files.items():
        save_file(sd, tmp_path / f"{name}.safetensors")
        results[name] = merged(read_lora(tmp_path / f"{name}.safetensors", CFG), base, 0.8)
    for name, got in results.items():
        assert_same(got, results["comfyui"])


def test_dora_on_either_axis(tmp_path):
    """ComfyUI normalises a per-row DoRA scale by the old weight's rows, a per-column one by the new weight's
    columns; strength 1 replaces the weight, other strengths blend."""
    for axis in ("out", "in"):
        s = specs(7, ["double_blocks.0.img_attn.qkv", "single_blocks.0.linear2"], dora=LAYERS, dora_axis=axis)
        save_file(write_bfl(s), tmp_path / f"{axis}.safetensors")
        lora = read_lora(tmp_path / f"{axis}.safetensors", CFG)
        base = base_weights(2)
        for strength in (1.0, 0.4, -0.5):
            assert_same(merged(lora, base, strength), reference(base, s, strength))


def test_norm_out_halves_are_swapped(tmp_path):
    """diffusers stores the final AdaLN as (scale, shift); ComfyUI swaps the delta's halves into BFL's order."""
    s = specs(9, ["final_layer.adaLN_modulation.1"])
    save_file({"transformer.norm_out.linear.lora_A.weight": s[0].down,
               "transformer.norm_out.linear.lora_B.weight": swap(s[0].up)}, tmp_path / "d.safetensors")
    (p,) = read_lora(tmp_path / "d.safetensors", CFG).patches
    assert p.target == "final_layer.adaLN_modulation.1.weight" and torch.equal(p.up, s[0].up)


def test_bias_deltas_land_on_their_rows(tmp_path):
    """A bias delta of a split or swapped diffusers layer lands on the bias rows its weight would (ComfyUI v0.8
    drops these: its bias name for a sliced target is broken), and PEFT's lora_B.bias is a bias delta."""
    g = torch.Generator().manual_seed(4)
    k_b, out_b, fal_b = torch.randn(H, generator=g), torch.randn(2 * H, generator=g), torch.randn(3 * H, generator=g)
    sd = {"transformer.transformer_blocks.0.attn.to_k.diff_b": k_b, "transformer.norm_out.linear.diff_b": out_b,
          "diffusion_model.txt_in.bias.diff": k_b.clone()}  # ComfyUI's generic name of a bias itself
    save_file(sd, tmp_path / "d.safetensors")
    base = base_weights()
    got = merged(read_lora(tmp_path / "d.safetensors", CFG), base, 0.5)
    want_qkv = base["double_blocks.0.img_attn.qkv.bias"].clone()
    want_qkv[H: 2 * H] += 0.5 * k_b
    assert_same(got, {"double_blocks.0.img_attn.qkv.bias": want_qkv, "txt_in.bias": base["txt_in.bias"] + 0.5 * k_b,
                      "final_layer.adaLN_modulation.1.bias": base["final_layer.adaLN_modulation.1.bias"]
                      + 0.5 * swap(out_b)})
    (s,) = specs(6, ["double_blocks.1.txt_attn.qkv"], alpha=None)
    save_file({"base_model.model.double_blocks.1.txt_attn.qkv.lora_A.weight": s.down,
               "base_model.model.double_blocks.1.txt_attn.qkv.lora_B.weight": s.up,
               "base_model.model.double_blocks.1.txt_attn.qkv.lora_B.bias": fal_b}, tmp_path / "fal.safetensors")
    s.diff_b = fal_b
    assert_same(merged(read_lora(tmp_path / "fal.safetensors", CFG), base, 0.9), reference(base, [s], 0.9))


def test_dora_scale_follows_swapped_rows(tmp_path):
    """A per-row DoRA scale on diffusers' norm_out is in (scale, shift) order like its rows, so it is swapped
    too (ComfyUI v0.8 swaps the delta but not the scale)."""
    s = specs(8, ["final_layer.adaLN_modulation.1"], dora=LAYERS)
    save_file(write_bfl(s), tmp_path / "bfl.safetensors")
    save_file(write_diffusers(s), tmp_path / "diffusers.safetensors")
    base = base_weights()
    want = reference(base, s, 0.6)
    for name in ("bfl", "diffusers"):
        assert_same(merged(read_lora(tmp_path / f"{name}.safetensors", CFG), base, 0.6), want)


def test_xlabs_mapping_equals_diffusers_converter(tmp_path):
    """diffusers' own XLabs converter (its q/k/v split) and our reading of the XLabs names give the same weights."""
    convert = pytest.importorskip("diffusers.loaders.lora_conversion_utils")._convert_xlabs_flux_lora_to_diffusers
    sd = LAYOUTS["xlabs"][0]
    save_file(sd, tmp_path / "xlabs.safetensors")
    save_file({k: v.clone() for k, v in convert(dict(sd)).items()}, tmp_path / "diffusers.safetensors")
    base = base_weights()
    ours, theirs = (read_lora(tmp_path / f"{n}.safetensors", CFG) for n in ("xlabs", "diffusers"))
    assert theirs.format == "diffusers"
    assert_same(merged(ours, base, 0.8), merged(theirs, base, 0.8))


def test_diffusers_saved_lora_equals_peft_merge(tmp_path):
    """A LoRA that PEFT trains on diffusers' Flux transformer and diffusers saves (its real key names and metadata)
    gives the weights PEFT's own merge gives, once both are in our layout (with lora_alpha = r, where diffusers and
    ComfyUI agree)."""
    pytest.importorskip("peft")
    diffusers = pytest.importorskip("diffusers")
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import get_peft_model_state_dict

    from kontext.flux_loader import load_dit

    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, out_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True,
        axes_dims_rope=(8, 28, 28))
    save_file(model.state_dict(), tmp_path / "base.safetensors")
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    config = LoraConfig(r=4, lora_alpha=4, target_modules=linears, init_lora_weights=False)
    model.add_adapter(config)
    diffusers.FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(model),
                                             transformer_lora_adapter_metadata=config.to_dict())
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    fused = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    save_file(fused, tmp_path / "fused.safetensors")
    base, want = (load_dit(tmp_path / f"{n}.safetensors").state_dict() for n in ("base", "fused"))
    lora = read_lora(tmp_path / "pytorch_lora_weights.safetensors", CFG)
    assert lora.format == "diffusers" and lora.unmatched == [] and lora.notes == []
    assert len(lora.patches) == len(linears)  # q, k, v (and the MLP input) are slices of our fused layers
    got = merged(lora, base, 1.0)
    assert sorted(got) == sorted(f"{la}.weight" for la in LAYERS)
    assert_same(got, {k: want[k] for k in got})


def test_unmatched_keys_are_listed(tmp_path):
    sd = write_bfl(specs(2, ["double_blocks.0.img_attn.qkv"]))
    extra = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
             "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4),
             "transformer.transformer_blocks.0.attn.norm_q.diff": torch.zeros(64),  # a norm scale: not a linear
             "diffusion_model.double_blocks.1.img_mlp.0.alpha": torch.tensor(4.0),  # an alpha with no LoRA
             "something.else": torch.zeros(3)}
    save_file({**sd, **extra}, tmp_path / "mixed.safetensors")
    lora = read_lora(tmp_path / "mixed.safetensors", CFG)
    assert lora.unmatched == sorted(extra) and len(lora.patches) == 1


def test_diffusers_metadata_alpha_is_noted(tmp_path):
    sd = write_diffusers(specs(3, ["double_blocks.0.img_mlp.2"], alpha=None))
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8})}
    save_file(sd, tmp_path / "m.safetensors", metadata=meta)
    lora = read_lora(tmp_path / "m.safetensors", CFG)
    assert lora.patches[0].alpha is None and "lora_alpha=8" in lora.notes[0]


def test_key_map_is_unambiguous_at_full_size():
    slots = key_map(FluxConfig())  # building it raises if one name maps two ways
    assert slots["lora_unet_single_blocks_37_linear1"].layer == "single_blocks.37.linear1"
    assert slots["transformer.single_transformer_blocks.37.proj_mlp"].rows == (9216, 9216 + 12288)


# ---- bad files ----------------------------------------------------------------------------------------------------

def _lora(up_shape, down_shape, name="diffusion_model.double_blocks.0.img_attn.qkv"):
    return {f"{name}.lora_up.weight": torch.zeros(*up_shape), f"{name}.lora_down.weight": torch.zeros(*down_shape)}


BAD = {
    "sdxl": ({"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
              "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8)}, "SDXL UNet LoRA"),
    "sd15": ({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 8),
              "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)}, "Stable Diffusion"),
    "text_encoder": ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
                      "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.zeros(4, 8)},
                     "text-encoder-only LoRA"),
    "flux2": ({**_lora((3 * H, 4), (4, H)),
               "diffusion_model.double_stream_modulation_img.lin.lora_A.weight": torch.zeros(4, H)}, "FLUX.2 LoRA"),
    "flux2_diffusers": ({"transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight":
                         torch.zeros(4, H)}, "FLUX.2 LoRA"),
    "qwen_image": ({"transformer_blocks.0.img_mlp.net.0.proj.lora_A.weight": torch.zeros(4, H)}, "Qwen-Image"),
    "lokr": ({"lycoris_transformer_blocks_0_attn_to_q.lokr_w1": torch.zeros(4, 4)},
             "LoKr LoRAs are not supported yet"),
    "loha": ({"lora_unet_double_blocks_0_img_attn_qkv.hada_w1_a": torch.zeros(4, 4)},
             "LoHa LoRAs are not supported yet"),
    "peft_dora": ({"transformer.x_embedder.lora_magnitude_vector": torch.ones(H)}, "PEFT DoRA"),
    "control": ({"img_in.lora_A.weight": torch.zeros(4, 128), "single_blocks.0.norm.key_norm.scale": torch.ones(64)},
                "Depth/Canny control LoRA"),
    "wrong_rank": (_lora((3 * H, 8), (4, H)), "needs [384, 4]"),
    "wide_model": (_lora((9216, 4), (4, 3072)), "[4, 3072] but this model needs [rank, 128]"),
    "deeper_model": ({**_lora((3 * H, 4), (4, H)),
                      **_lora((3 * H, 4), (4, H), "lora_unet_double_blocks_18_img_attn_qkv")},
                     "double_blocks 18, but this model has 2"),
    "half_pair": ({"diffusion_model.img_in.lora_up.weight": torch.zeros(H, 4)}, "has no matching down"),
    "two_spellings": ({**_lora((3 * H, 4), (4, H)),
                       "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(3 * H, 4)},
                      "are both the up of layer"),
    "overlap": ({**_lora((3 * H, 4), (4, H), "diffusion_model.single_blocks.0.linear1_qkv"),
                 **_lora((H, 4), (4, H), "transformer.single_transformer_blocks.0.attn.to_k")}, "both patch"),
    "bad_dora": ({**_lora((3 * H, 4), (4, H)),
                  "diffusion_model.double_blocks.0.img_attn.qkv.dora_scale": torch.ones(3 * H)}, "dora_scale"),
    "no_lora_keys": ({"foo.bar": torch.zeros(3), "baz": torch.zeros(2)}, "holds no LoRA tensors"),
    "full_model": ({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 2), "img_in.weight": torch.zeros(2, 2)},
                   "a full FLUX.1 DiT checkpoint"),
    "unknown_layout": ({"blocks.0.attn.lora_A.weight": torch.zeros(4, 8)}, "unknown layout"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_lora_is_refused(name, tmp_path):
    sd, message = BAD[name]
    path = tmp_path / f"{name}.safetensors"
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=re.escape(message)) as info:
        read_lora(path, CFG)
    assert str(path) in str(info.value)


def test_layer_and_shapes_named_for_another_size(tmp_path):
    save_file(_lora((9216, 4), (4, 3072)), tmp_path / "big.safetensors")
    with pytest.raises(CheckpointError) as info:
        read_lora(tmp_path / "big.safetensors", CFG)
    assert "double_blocks.0.img_attn.qkv" in str(info.value) and "another model size" in str(info.value)


def test_pickle_is_never_opened(tmp_path):
    path = tmp_path / "lora.pt"
    torch.save({"x": torch.zeros(1)}, path)  # a real pickle: refused by its suffix, before any byte is read
    with pytest.raises(CheckpointError, match="pickle-based and are never opened"):
        read_lora(path, CFG)


@pytest.mark.parametrize("cut", ["truncated", "empty", "garbage"])
def test_damaged_file_is_refused(cut, tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file(write_bfl(specs(1, ["img_in"])), path)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:-10], "empty": b"", "garbage": b"\x00" * 64}[cut])
    with pytest.raises(CheckpointError, match="truncated|not a safetensors file"):
        read_lora(path, CFG)


# ---- against ComfyUI's own LoRA code ---------------------------------------------------------------------------

COMFY_SCRIPT = textwrap.dedent('''
    import json, logging, sys
    sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI reads its flags at import
    sys.path.insert(0, COMFY)
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch
    from safetensors.torch import load_file, save_file
    import comfy.lora, comfy.lora_convert, comfy.model_base, comfy.model_patcher, comfy.supported_models

    class Skipped(logging.Handler):  # load_lora's "lora key not loaded" and load_lora_for_models' "NOT LOADED"
        def __init__(self):
            super().__init__()
            self.lines = []
        def emit(self, record):
            self.lines.append(record.getMessage())
    skipped = Skipped()
    logging.getLogger().addHandler(skipped)

    config = comfy.supported_models.Flux(UNET_CONFIG)
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.Flux(config, device="cpu")
    base = load_file(BASE)
    model.diffusion_model.load_state_dict(base, strict=True)
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    out, report = {}, {}
    cpu = torch.device("cpu")
    for job in JOBS:
        skipped.lines = []
        sd = load_file(job["file"])
        sd = comfy.lora_convert.convert_uso_lora(sd) if job["uso"] else comfy.lora_convert.convert_lora(sd)
        loaded = comfy.lora.load_lora(sd, key_map)
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
        added = set(patcher.add_patches(loaded, job["strength"]))
        skipped.lines += [f"NOT LOADED {k}" for k in loaded if k not in added]
        for key, patches in patcher.patches.items():  # as patch_weight_to_device: on a float32 copy
            name = key[len("diffusion_model."):]
            out[job["name"] + "|" + name] = comfy.lora.calculate_weight(patches, base[name].clone().float(), key)
        report[job["name"]] = skipped.lines
    save_file(out, OUT)
    maps = {k: [v, None, False] if isinstance(v, str) else [v[0], list(v[1]) if v[1] else None, len(v) > 2]
            for k, v in key_map.items()}
    json.dump({"skipped": report, "key_map": maps}, open(REPORT, "w"))
''')

# Layouts ComfyUI does not read itself go to it under the names it does read (the tensors are the same).
RENAMED = {"bfl_bare": ("", "diffusion_model."), "bfl_model_prefix": ("model.diffusion_model.", "diffusion_model."),
           "fal": ("base_model.model.", "diffusion_model."), "peft": ("base_model.model.", "transformer."),
           "diffusers_bare_no_alpha": ("", "transformer.")}


def comfy_jobs(folder: Path) -> dict[str, tuple[Path, Path, float]]:
    """name -> (our file, ComfyUI's file, strength), for every layout and for DoRA on both axes."""
    sets = {name: (sd, 0.7) for name, (sd, _, _) in LAYOUTS.items()}
    for axis in ("out", "in"):
        s = specs(7, ["double_blocks.0.img_attn.qkv", "single_blocks.0.linear2"], dora=LAYERS, dora_axis=axis)
        sets[f"dora_{axis}_1.0"], sets[f"dora_{axis}_0.4"] = (write_bfl(s), 1.0), (write_bfl(s), 0.4)
    jobs = {}
    for name, (sd, strength) in sets.items():
        save_file(sd, folder / f"{name}.safetensors")
        theirs = folder / f"{name}.safetensors"
        if name in RENAMED:
            old, new = RENAMED[name]
            theirs = folder / f"{name}.comfy.safetensors"
            save_file({new + k[len(old):]: v for k, v in sd.items()}, theirs)
        jobs[name] = (folder / f"{name}.safetensors", theirs, strength)
    return jobs


@pytest.fixture(scope="module")
def comfy_run(tmp_path_factory):
    if not COMFYUI_DIR:
        pytest.skip("needs a real ComfyUI: set COMFYUI_DIR (tests/comfyui_env.sh DEST builds one)")
    folder = tmp_path_factory.mktemp("comfy_lora")
    base = base_weights(4)
    save_file(base, folder / "base.safetensors")
    jobs = comfy_jobs(folder)
    unet = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 64,
            "context_in_dim": 64, "hidden_size": H, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2,
            "depth_single_blocks": 2, "axes_dim": [8, 28, 28], "theta": 10000, "qkv_bias": True,
            "guidance_embed": True, "txt_ids_dims": []}
    job_list = [{"name": n, "file": str(theirs), "strength": s, "uso": n == "xlabs"}
                for n, (_, theirs, s) in jobs.items()]
    script = f"COMFY = {COMFYUI_DIR!r}\nUNET_CONFIG = {unet!r}\nBASE = {str(folder / 'base.safetensors')!r}\n" \
             f"JOBS = {job_list!r}\nOUT = {str(folder / 'out.safetensors')!r}\n" \
             f"REPORT = {str(folder / 'report.json')!r}\n" + COMFY_SCRIPT
    python = os.environ.get("COMFYUI_PYTHON") or str(Path(COMFYUI_DIR) / ".venv" / "bin" / "python")
    run = subprocess.run([python, "-c", script], cwd=COMFYUI_DIR, capture_output=True, text=True, timeout=300,
                         check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return base, jobs, load_file(folder / "out.safetensors"), json.loads((folder / "report.json").read_text())


@pytest.mark.comfyui
def test_merged_weights_equal_comfyuis(comfy_run):
    base, jobs, theirs, report = comfy_run
    for name, (ours_file, _, strength) in jobs.items():
        assert report["skipped"][name] == [], (name, report["skipped"][name][:5])  # ComfyUI used every key
        want = {k.split("|", 1)[1]: v for k, v in theirs.items() if k.startswith(name + "|")}
        assert want, name
        got = merged(read_lora(ours_file, CFG), base, strength)
        assert sorted(got) == sorted(want), name
        for key, w in want.items():
            assert rel_err(got[key], w) < 1e-6 and torch.allclose(got[key], w, rtol=0, atol=1e-6), (name, key)


@pytest.mark.comfyui
def test_key_map_equals_comfyuis(comfy_run):
    """Every Flux LoRA name ComfyUI maps onto a linear layer (or its bias) is ours too, landing on the same rows;
    and every name of ours in a family ComfyUI reads is one of ComfyUI's."""
    theirs = comfy_run[3]["key_map"]
    ours = key_map(CFG)
    linear = {k for k, s in SHAPES.items() if len(s) == 2}
    biases = {k for k in SHAPES if k.endswith(".bias")}
    checked = 0
    for name, (target, offset, swapped) in theirs.items():
        target = target[len("diffusion_model."):]
        if target not in linear | biases:
            continue  # norm scales: ComfyUI maps them too, we leave their deltas unmatched
        slot = ours[name]
        leaf = "bias" if target in biases else "weight"
        rows = None if offset is None else (offset[1], offset[1] + offset[2])
        assert (f"{slot.layer}.{slot.leaf}", slot.rows, slot.swap, slot.leaf) == (target, rows, swapped, leaf), name
        checked += 1
    comfy_families = {"comfyui", "kohya", "lycoris", "onetrainer"}
    mine = {n for n, s in ours.items() if s.family in comfy_families or n.startswith("transformer.")}
    assert mine <= set(theirs) and checked == len(mine)
