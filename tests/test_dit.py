"""The Flux DiT: full-size structure, parity with diffusers on every checkpoint layout, reference ids."""
from __future__ import annotations

import re

import pytest
import torch
from conftest import rel_err
from safetensors.torch import load_file

import kontext
from kontext.flux_keys import diffusers_plan
from kontext.ids import image_ids, reference_ids, text_ids

diffusers = pytest.importorskip("diffusers")


def test_full_size_structure_matches_release_file(checkpoint_tables):
    with torch.device("meta"):
        model = kontext.FluxDiT(kontext.FluxConfig.kontext_dev())
    ours = {n: list(p.shape) for n, p in model.named_parameters()}
    assert ours == {n: s for n, s in checkpoint_tables["flux_bfl"]}


def test_diffusers_key_map_covers_release_folder_exactly(checkpoint_tables):
    config = kontext.FluxConfig.kontext_dev()
    plan = diffusers_plan(config, "")
    with torch.device("meta"):
        names = {n for n, _ in kontext.FluxDiT(config).named_parameters()}
    assert set(plan) == names
    assert {k for s in plan.values() for k in s.keys} == {n for n, _ in checkpoint_tables["flux_diffusers"]}


RENAMES = [  # BFL name pattern -> diffusers name, written independently of kontext.flux_keys
    (r"img_in\.", "x_embedder."), (r"txt_in\.", "context_embedder."),
    (r"time_in\.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    (r"time_in\.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    (r"vector_in\.in_layer", "time_text_embed.text_embedder.linear_1"),
    (r"vector_in\.out_layer", "time_text_embed.text_embedder.linear_2"),
    (r"guidance_in\.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    (r"guidance_in\.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    (r"double_blocks\.(\d+)\.img_mod\.lin", r"transformer_blocks.\1.norm1.linear"),
    (r"double_blocks\.(\d+)\.txt_mod\.lin", r"transformer_blocks.\1.norm1_context.linear"),
    (r"double_blocks\.(\d+)\.img_attn\.norm\.query_norm\.scale", r"transformer_blocks.\1.attn.norm_q.weight"),
    (r"double_blocks\.(\d+)\.img_attn\.norm\.key_norm\.scale", r"transformer_blocks.\1.attn.norm_k.weight"),
    (r"double_blocks\.(\d+)\.txt_attn\.norm\.query_norm\.scale", r"transformer_blocks.\1.attn.norm_added_q.weight"),
    (r"double_blocks\.(\d+)\.txt_attn\.norm\.key_norm\.scale", r"transformer_blocks.\1.attn.norm_added_k.weight"),
    (r"double_blocks\.(\d+)\.img_attn\.proj", r"transformer_blocks.\1.attn.to_out.0"),
    (r"double_blocks\.(\d+)\.txt_attn\.proj", r"transformer_blocks.\1.attn.to_add_out"),
    (r"double_blocks\.(\d+)\.img_mlp\.0", r"transformer_blocks.\1.ff.net.0.proj"),
    (r"double_blocks\.(\d+)\.img_mlp\.2", r"transformer_blocks.\1.ff.net.2"),
    (r"double_blocks\.(\d+)\.txt_mlp\.0", r"transformer_blocks.\1.ff_context.net.0.proj"),
    (r"double_blocks\.(\d+)\.txt_mlp\.2", r"transformer_blocks.\1.ff_context.net.2"),
    (r"single_blocks\.(\d+)\.linear2", r"single_transformer_blocks.\1.proj_out"),
    (r"single_blocks\.(\d+)\.modulation\.lin", r"single_transformer_blocks.\1.norm.linear"),
    (r"single_blocks\.(\d+)\.norm\.query_norm\.scale", r"single_transformer_blocks.\1.attn.norm_q.weight"),
    (r"single_blocks\.(\d+)\.norm\.key_norm\.scale", r"single_transformer_blocks.\1.attn.norm_k.weight"),
    (r"final_layer\.linear", "proj_out"),
]


def to_diffusers(sd: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in sd.items():
        if m := re.fullmatch(r"double_blocks\.(\d+)\.(img|txt)_attn\.qkv\.(weight|bias)", key):
            i, s, leaf = m.groups()
            names = ["to_q", "to_k", "to_v"] if s == "img" else ["add_q_proj", "add_k_proj", "add_v_proj"]
            for n, part in zip(names, t.chunk(3)):
                out[f"transformer_blocks.{i}.attn.{n}.{leaf}"] = part
        elif m := re.fullmatch(r"single_blocks\.(\d+)\.linear1\.(weight|bias)", key):
            i, leaf = m.groups()
            q, k, v, mlp = t.split([hidden, hidden, hidden, t.shape[0] - 3 * hidden])
            for n, part in zip(["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], [q, k, v, mlp]):
                out[f"single_transformer_blocks.{i}.{n}.{leaf}"] = part
        elif key.startswith("final_layer.adaLN_modulation.1."):
            shift, scale = t.chunk(2)
            out["norm_out.linear." + key.rsplit(".", 1)[1]] = torch.cat([scale, shift])
        else:
            new = key
            for pat, rep in RENAMES:
                new = re.sub("^" + pat, rep, new)
            assert new != key, key
            out[new] = t
    return out


def reference_model(bfl_file) -> torch.nn.Module:
    """diffusers' FluxTransformer2DModel holding the BFL file's weights (renamed by the test's own map)."""
    from diffusers import FluxTransformer2DModel

    c = kontext.FluxConfig.tiny()
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=c.depth, num_single_layers=c.depth_single_blocks,
                                   attention_head_dim=c.head_dim, num_attention_heads=c.num_heads,
                                   joint_attention_dim=c.context_in_dim, pooled_projection_dim=c.vec_in_dim,
                                   guidance_embeds=True, axes_dims_rope=c.axes_dim)
    sd = to_diffusers({k: v.float() for k, v in load_file(bfl_file).items()}, c.hidden_size)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def inputs(n_refs: int, seed: int = 0, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    target = (8, 12)  # latent size (rows, cols) of a 64x96 px target: a 4x6 token grid
    refs = [(12, 8), (8, 8)][:n_refs]
    n = sum(h * w // 4 for h, w in [target, *refs])
    img = torch.randn(batch, n, 64, generator=g)
    txt = torch.randn(batch, 7, 64, generator=g)
    y = torch.randn(batch, 64, generator=g)
    t = torch.full((batch,), 0.7)
    guidance = torch.full((batch,), 2.5)
    return img, image_ids(target, refs, "offset", batch), txt, text_ids(7, batch), t, y, guidance


@pytest.fixture(scope="module")
def reference(tiny_models):
    return reference_model(tiny_models["dit"])


@pytest.mark.parametrize("layout", ["dit", "dit_fp8", "dit_diffusers"])
@pytest.mark.parametrize("n_refs", [0, 1, 2])
def test_parity_with_diffusers_fp32(tiny_models, reference, layout, n_refs):
    model = kontext.load_dit(tiny_models[layout], dtype=torch.float32)
    img, img_ids, txt, txt_ids, t, y, g = inputs(n_refs, seed=n_refs)
    with torch.no_grad():
        ours = model(img, img_ids, txt, txt_ids, t, y, g)
        theirs = reference(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                           img_ids=img_ids[0], txt_ids=txt_ids[0], guidance=g, return_dict=False)[0]
    assert ours.shape == img.shape
    # fp32 on CPU, same weights, same op order up to summation order in matmuls: agreement to ~1e-6 expected.
    assert rel_err(ours, theirs) <= 1e-5


def test_bf16_close_to_fp32(tiny_models):
    img, img_ids, txt, txt_ids, t, y, g = inputs(2, batch=2)
    with torch.no_grad():
        full = kontext.load_dit(tiny_models["dit"], dtype=torch.float32)(img, img_ids, txt, txt_ids, t, y, g)
        half = kontext.load_dit(tiny_models["dit"], precision="bf16")(img, img_ids, txt, txt_ids, t, y, g)
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    # bf16 keeps 8 bits of mantissa (~4e-3 per op); through 4 blocks the error stays under 2e-2 of the output range.
    assert rel_err(half.float(), full) <= 2e-2


def test_batch_items_are_independent(tiny_models):
    model = kontext.load_dit(tiny_models["dit"])
    img, img_ids, txt, txt_ids, t, y, g = inputs(1, batch=2)
    with torch.no_grad():
        both = model(img, img_ids, txt, txt_ids, t, y, g)
        one = model(img[1:], img_ids[1:], txt[1:], txt_ids[1:], t[1:], y[1:], g[1:])
    assert rel_err(both[1:], one) <= 1e-5


def test_offset_ids_place_references_on_one_canvas():
    a, b, c = reference_ids([(8, 12), (8, 12), (4, 4)], "offset")  # latent sizes: 4x6, 4x6, 2x2 token grids
    assert (a[:, 0] == 1).all() and (b[:, 0] == 1).all() and (c[:, 0] == 1).all()
    # First at the origin; the canvas (4x6) is wider than tall, so the second goes below, the third to the right.
    assert a[:, 1:].min(0).values.tolist() == [0, 0] and a[:, 1:].max(0).values.tolist() == [3, 5]
    assert b[:, 1:].min(0).values.tolist() == [4, 0] and b[:, 1:].max(0).values.tolist() == [7, 5]
    assert c[:, 1:].min(0).values.tolist() == [0, 6]
    positions = {tuple(r) for r in torch.cat([a, b, c])[:, 1:].tolist()}
    assert len(positions) == 24 + 24 + 4  # no two reference tokens share a place


def test_offset_ids_two_references_tall_go_right():
    a, b = reference_ids([(12, 8), (12, 8)], "offset")
    assert b[:, 1:].min(0).values.tolist() == [0, 4]


def comfyui_offsets(sizes):
    """ComfyUI's placement loop (comfy/ldm/flux/model.py), restated: latent-pixel canvas, offsets rounded by patch."""
    h = w = 0
    out = []
    for rh, rw in sizes:
        h_off = w_off = 0
        if rh + h > rw + w:
            w_off = w
        else:
            h_off = h
        out.append(((h_off + 1) // 2, (w_off + 1) // 2, (rh + 1) // 2, (rw + 1) // 2))
        h, w = max(h, rh + h_off), max(w, rw + w_off)
    return out


def test_offset_ids_with_odd_latents_match_comfyui_rounding():
    sizes = [(125, 125), (63, 101), (77, 30)]  # e.g. ComfyUI's VAEEncode of a 1000x1000 image gives 125x125
    for ids, (h_off, w_off, gh, gw) in zip(reference_ids(sizes, "offset"), comfyui_offsets(sizes)):
        assert ids.shape == (gh * gw, 3)
        assert ids[:, 1:].min(0).values.tolist() == [h_off, w_off]


def test_index_ids_count_up_at_origin():
    refs = reference_ids([(4, 6), (6, 4), (4, 4)], "index")
    for k, ids in enumerate(refs, start=1):
        assert (ids[:, 0] == k).all() and ids[:, 1:].min().item() == 0
    assert refs[0].tolist()[:4] == [[1, 0, 0], [1, 0, 1], [1, 0, 2], [1, 1, 0]]


def test_target_ids_and_text_ids():
    ids = image_ids((4, 6), [(2, 2)], batch=2)
    assert ids.shape == (2, 7, 3) and (ids[:, :6, 0] == 0).all() and (ids[:, 6] == torch.tensor([1.0, 0, 0])).all()
    assert text_ids(5, 2).abs().sum() == 0


def test_unknown_id_method():
    with pytest.raises(ValueError, match="offset"):
        reference_ids([(1, 1)], "sideways")


def test_tiny_diffusers_folder_loads_in_diffusers(tiny_models, reference):
    """make-tiny's diffusers folder is a real diffusers folder: from_pretrained reads it to the same model."""
    from diffusers import FluxTransformer2DModel

    folder_model = FluxTransformer2DModel.from_pretrained(tiny_models["dit_diffusers"], torch_dtype=torch.float32)
    img, img_ids, txt, txt_ids, t, y, g = inputs(1)
    kw = dict(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t, img_ids=img_ids[0],
              txt_ids=txt_ids[0], guidance=g, return_dict=False)
    with torch.no_grad():
        assert torch.equal(folder_model(**kw)[0], reference(**kw)[0])
