"""The pack's MODEL (nodes/model.py) called the way ComfyUI's Flux model class calls its diffusion model.

Stand-in of ComfyUI's call (comfy/model_base.py `_apply_model` and `Flux.extra_conds`): the latent x and the
reference latents arrive already scaled and shifted (`process_latent_in`), the timestep is sigma, guidance a [B]
tensor, `ref_latents_method` a keyword. The result must be the engine's velocity for the same raw inputs, to float
rounding (fp32: the model-space round trip of the references costs ~1e-7).
"""
from __future__ import annotations

import logging

import pytest
import torch
from conftest import rel_err

import kontext
from kontext.denoiser import Denoiser
from kontext.errors import InputError
from kontext.latents import to_model_space
from nodes.model import ComfyRope, KontextFlux, StandaloneModel, kontext_dit


@pytest.fixture(scope="module")
def dit(tiny_models):
    return kontext.load_dit(tiny_models["dit"])


def inputs(batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    raw_refs = [torch.randn(1, 16, 9, 7, generator=g), torch.randn(1, 16, 6, 8, generator=g)]
    return dict(x=torch.randn(batch, 16, 7, 10, generator=g), t=torch.full((batch,), 0.63),
                txt=torch.randn(batch, 9, 64, generator=g), y=torch.randn(batch, 64, generator=g),
                g=torch.full((batch,), 2.5)), raw_refs


@pytest.mark.parametrize("method", ["offset", "index"])
@pytest.mark.parametrize("batch", [1, 2])
def test_comfyui_call_gives_the_engines_velocity(dit, method, batch):
    io, raw_refs = inputs(batch)
    model = KontextFlux(dit)
    with torch.no_grad():
        theirs_call = model(io["x"], io["t"], io["txt"], y=io["y"], guidance=io["g"],
                            ref_latents=[to_model_space(r) for r in raw_refs], ref_latents_method=method)
        ours = Denoiser(dit, (7, 10), raw_refs, method)(io["x"], io["t"], io["txt"], io["y"], io["g"])
    assert theirs_call.shape == io["x"].shape
    assert rel_err(theirs_call, ours) <= 1e-6


def test_parameters_keep_bfl_names_and_are_the_dits_own(dit):
    model = KontextFlux(dit)
    names = dict(model.named_parameters())
    assert "double_blocks.0.img_attn.qkv.weight" in names and "kontext_dit.img_in.weight" not in names
    assert names["img_in.weight"] is dit.img_in.weight and len(names) == len(dict(dit.named_parameters()))
    assert model.dtype == dit.compute_dtype and kontext_dit(StandaloneModel(dit, torch.device("cpu"))) is dit


def test_denoiser_is_built_once_per_run(dit):
    io, raw_refs = inputs()
    refs = [to_model_space(r) for r in raw_refs]
    model = KontextFlux(dit)
    with torch.no_grad():
        model(io["x"], io["t"], io["txt"], y=io["y"], guidance=io["g"], ref_latents=refs)
        first = model._denoiser[2]
        model(io["x"], io["t"] * 0.5, io["txt"], y=io["y"], guidance=io["g"], ref_latents=[r.clone() for r in refs])
        assert model._denoiser[2] is first  # the same references as new tensors: reused
        model(io["x"], io["t"], io["txt"], y=io["y"], guidance=io["g"], ref_latents=[refs[0] + 1, refs[1]])
        assert model._denoiser[2] is not first  # other references: a new run


def test_unsupported_methods_and_inputs(dit, caplog):
    io, raw_refs = inputs()
    model = KontextFlux(dit)
    with pytest.raises(InputError, match="'uxo' is not supported"):
        model(io["x"], io["t"], io["txt"], y=io["y"], guidance=io["g"], ref_latents=[], ref_latents_method="uxo")
    with caplog.at_level(logging.WARNING), torch.no_grad():
        model(io["x"], io["t"], io["txt"], y=io["y"], guidance=io["g"], attention_mask=torch.ones(1, 4),
              transformer_options={"patches": {"post_input": [lambda a: a]}})
    assert "'attention_mask'" in caplog.text and "'post_input'" in caplog.text and "ignored" in caplog.text
    with pytest.raises(InputError, match="FluxGuidance"):
        model(io["x"], io["t"], io["txt"], y=io["y"], guidance=None)
    with pytest.raises(InputError, match="Load Kontext Model"):
        kontext_dit(object())


def test_block_patches_and_controlnet_residuals_as_comfyui_applies_them(dit):
    """A replacing block patch that calls the original and doubles its image output, and ControlNet residuals,
    change the result exactly as the same edits applied by hand inside the engine's blocks."""
    io, _ = inputs()
    seen = []

    def patch(args, extra):
        seen.append(args["transformer_options"]["block_index"])
        out = extra["original_block"](args)
        return {"img": out["img"] * 2, "txt": out["txt"]}

    n_img = 4 * 5  # a 7x10 latent: 4 x 5 tokens
    control = {"input": [torch.full((1, n_img, 128), 0.1)], "output": [None, torch.full((1, n_img, 128), -0.2)]}
    model = KontextFlux(dit)
    with torch.no_grad():
        got = model(io["x"], io["t"], io["txt"], y=io["y"], guidance=io["g"], control=control,
                    transformer_options={"patches_replace": {"dit": {("double_block", 1): patch}}})
    assert seen == [1]

    class ByHand(kontext.dit.BlockRunner):
        def double(self, i, block, img, txt, vec, pe):
            img, txt = block(img, txt, vec, pe)
            img = img * 2 if i == 1 else img
            return (img + 0.1 if i == 0 else img), txt

        def single(self, i, block, x, vec, pe, n_txt):
            x = block(x, vec, pe)
            if i == 1:
                x = torch.cat([x[:, :n_txt], x[:, n_txt:] - 0.2], 1)
            return x

    with torch.no_grad():
        want = Denoiser(dit, (7, 10))(io["x"], io["t"], io["txt"], io["y"], io["g"], ByHand())
        plain = model(io["x"], io["t"], io["txt"], y=io["y"], guidance=io["g"])
    assert rel_err(got, want) <= 1e-6 and rel_err(got, plain) > 1e-3


def test_patches_get_comfyuis_rope_tensor_made_once_a_run(dit):
    """The `pe` a block patch gets is ComfyUI's layout, [B, 1, N, D/2, 2, 2] = [[cos, -sin], [sin, cos]] per pair
    (tests/test_comfyui_model.py compares it with ComfyUI's own); it is made once per run and batch size, and a pe
    handed back, or a copy of it, gives back the run's tables."""
    io, refs = inputs(batch=2)
    model = KontextFlux(dit)
    got = []

    def patch(args, extra):
        got.append(args["pe"])
        return extra["original_block"]({**args, "pe": args["pe"].clone()} if len(got) > 1 else args)

    opts = {"patches_replace": {"dit": {("double_block", 0): patch}}}
    with torch.no_grad():
        for _ in range(2):
            patched = model(io["x"], io["t"], io["txt"], y=io["y"], guidance=io["g"], transformer_options=opts)
        plain = model(io["x"], io["t"], io["txt"], y=io["y"], guidance=io["g"])
    assert torch.equal(patched, plain)  # the original block ran with the run's own tables
    assert got[0] is got[1]  # made once, not per step
    pe = model.denoiser(io["x"], [], "offset").positions(io["txt"].shape[1])
    n = pe.cos.shape[2]
    assert got[0].shape == (2, 1, n, pe.cos.shape[-1], 2, 2) and got[0].dtype == torch.float32
    assert torch.equal(got[0][0, :, :, :, 0, 0], pe.cos[0]) and torch.equal(got[0][0, :, :, :, 0, 1], -pe.sin[0])
    assert torch.equal(got[0][1, :, :, :, 1, 0], pe.sin[0]) and torch.equal(got[0][1, :, :, :, 1, 1], pe.cos[0])
    rope = ComfyRope()
    tensor = rope.to_comfy(pe, 3)
    assert rope.from_comfy(tensor) is pe and rope.to_comfy(pe, 3) is tensor
    back = rope.from_comfy(tensor.clone())
    assert torch.equal(back.cos, pe.cos.expand(3, -1, -1, -1)) and torch.equal(back.sin, pe.sin.expand(3, -1, -1, -1))


def test_run_time_weight_functions_never_change_the_stored_weights(tiny_models):
    """ComfyUI's LoRA functions may add in place (comfy.lora.calculate_weight does): each call must start from the
    stored weight, dense or fp8, so a LoRA is applied once per call and never accumulates."""
    for path in (tiny_models["dit"], tiny_models["dit_fp8"]):
        layer = kontext.load_dit(path).double_blocks[0].img_attn.qkv
        before = layer.weight.clone()
        layer.weight_function = [lambda w: w.add_(1.0)]
        x = torch.randn(2, 128)
        with torch.no_grad():
            first, second = layer(x), layer(x)
        assert torch.equal(first, second) and torch.equal(layer.weight.view(torch.uint8), before.view(torch.uint8))
        layer.weight_function = []
        with torch.no_grad():
            assert not torch.allclose(layer(x), first)  # the function did change the result
