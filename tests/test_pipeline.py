"""The whole edit against diffusers' FluxKontextPipeline built from the same tiny weights, plus pipeline behaviour."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import kontext
from kontext.errors import Cancelled, InputError
from kontext.pipeline import KontextPipeline

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ours(tiny_models):
    return KontextPipeline.from_models_dir(tiny_models["dit"].parents[1], device="cpu")


@pytest.fixture(scope="module")
def theirs(tiny_models, tmp_path_factory):
    """diffusers' pipeline with the same weights, each component loaded by its own library."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
    from test_dit import to_diffusers
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    from kontext.tiny.text import write_tiny_clip_l_diffusers, write_tiny_t5xxl_diffusers
    from kontext.tiny.vae import write_tiny_vae_diffusers

    tmp = tmp_path_factory.mktemp("diffusers")
    c = kontext.FluxConfig.tiny()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=c.depth, num_single_layers=c.depth_single_blocks,
        attention_head_dim=c.head_dim, num_attention_heads=c.num_heads, joint_attention_dim=c.context_in_dim,
        pooled_projection_dim=c.vec_in_dim, guidance_embeds=True, axes_dims_rope=c.axes_dim)
    transformer.load_state_dict(to_diffusers({k: v.float() for k, v in load_file(tiny_models["dit"]).items()},
                                             c.hidden_size))
    tok = tiny_models["tokenizers"]
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                                                max_shift=1.15, use_dynamic_shifting=True, shift=3.0,
                                                time_shift_type="exponential")
    pipe = FluxKontextPipeline(
        scheduler=scheduler,
        vae=AutoencoderKL.from_pretrained(write_tiny_vae_diffusers(tmp / "vae")),
        text_encoder=CLIPTextModel.from_pretrained(write_tiny_clip_l_diffusers(tmp / "text_encoder"),
                                                   torch_dtype=torch.float32),
        tokenizer=CLIPTokenizer.from_pretrained(tok / "clip_l"),
        text_encoder_2=T5EncoderModel.from_pretrained(write_tiny_t5xxl_diffusers(tmp / "text_encoder_2"),
                                                      torch_dtype=torch.float32),
        tokenizer_2=T5TokenizerFast.from_pretrained(tok / "t5xxl"),
        transformer=transformer)
    return pipe.to(torch.float32)


def reference_image(w: int, h: int, seed: int) -> Image.Image:
    """A smooth, non-square test picture (random noise would make the VAE's job meaningless)."""
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    rng = np.random.default_rng(seed)
    phases = rng.uniform(0, 6.28, size=3)
    rgb = np.stack([np.sin(7 * xx + 3 * yy + p) for p in phases], -1) * 0.5 + 0.5
    return Image.fromarray((rgb * 255).astype(np.uint8))


CASES = [  # (prompt, seed, reference size, output size, steps)
    ("make it night", 0, (160, 96), (128, 112), 4),
    ("a red car on a beach, photorealistic", 42, (96, 176), (144, 96), 3),
]


@pytest.mark.parametrize("prompt,seed,ref_size,out_size,steps", CASES)
def test_edit_matches_diffusers(ours, theirs, prompt, seed, ref_size, out_size, steps):
    ref = reference_image(*ref_size, seed)
    w, h = out_size
    a = ours.edit(prompt, [ref], seed=seed, steps=steps, width=w, height=h, resize_references=False)[0]
    b = theirs(image=ref, prompt=prompt, height=h, width=w, num_inference_steps=steps, guidance_scale=2.5,
               generator=torch.Generator("cpu").manual_seed(seed), max_area=w * h, _auto_resize=False,
               max_sequence_length=512, output_type="pil").images[0]
    assert a.size == b.size == (w, h)
    diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    # Same fp32 math in a different order: at most a rounding step on a few pixels (the tolerance is 2/255).
    assert diff.max() <= 2, diff.max()


def test_same_seed_same_image_and_seed_matters(ours):
    ref = reference_image(64, 64, 1)
    a = ours.edit("x", [ref], seed=3, steps=2, width=64, height=64, resize_references=False)[0]
    b = ours.edit("x", [ref], seed=3, steps=2, width=64, height=64, resize_references=False)[0]
    c = ours.edit("x", [ref], seed=4, steps=2, width=64, height=64, resize_references=False)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_output_defaults_to_preferred_reference_size(ours, monkeypatch):
    seen = {}
    import kontext.pipeline as P

    def spy(*args, **kw):
        seen.update(width=kw["width"], height=kw["height"], refs=[r.shape for r in kw["ref_latents"]])
        raise Cancelled("stop after recording")

    monkeypatch.setattr(P, "sample_latent", spy)
    monkeypatch.setattr(ours.vae, "encode", lambda px: torch.zeros(1, 16, px.shape[2] // 8, px.shape[3] // 8))
    with pytest.raises(Cancelled):
        ours.edit("x", [reference_image(300, 200, 0)], steps=1)
    assert (seen["width"], seen["height"]) == (1248, 832)  # 3:2 -> the nearest preferred resolution
    assert seen["refs"] == [torch.Size([1, 16, 104, 156])]


def test_text_to_image_and_two_references(ours):
    t2i = ours.edit("a lighthouse", [], seed=1, steps=2, width=96, height=64)[0]
    assert t2i.size == (96, 64)
    refs = [reference_image(64, 32, 0), reference_image(32, 64, 1)]
    for method in ("offset", "index"):
        out = ours.edit("combine them", refs, seed=1, steps=2, width=64, height=64, resize_references=False,
                        reference_method=method)[0]
        assert out.size == (64, 64)


def test_true_cfg_and_denoise(ours):
    ref = reference_image(64, 64, 2)
    plain = ours.edit("x", [ref], seed=5, steps=2, width=64, height=64, resize_references=False)[0]
    cfg = ours.edit("x", [ref], seed=5, steps=2, width=64, height=64, resize_references=False, negative_prompt="blurry", true_cfg=3.0)[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(cfg))
    other = reference_image(64, 64, 9)
    kw = dict(seed=5, steps=4, width=64, height=64, resize_references=False)
    light = [np.asarray(ours.edit("x", [ref], denoise=0.25, init_image=i, **kw)[0]) for i in (ref, other)]
    full = [np.asarray(ours.edit("x", [ref], denoise=1.0, init_image=i, **kw)[0]) for i in (ref, other)]
    assert not np.array_equal(light[0], light[1])  # image-to-image starts from the init image
    assert np.array_equal(full[0], full[1])  # full denoise starts from pure noise: the init image is unused
    assert not np.array_equal(light[0], full[0])


def test_cancel_mid_run_stops_within_one_step(ours):
    calls = []

    def cb(step, total, latent):
        calls.append(step)
        assert latent.shape == (1, 16, 8, 8)
        if step == 1:
            raise Cancelled("user pressed cancel")

    with pytest.raises(Cancelled):
        ours.edit("x", [reference_image(64, 64, 0)], steps=10, width=64, height=64, resize_references=False, callback=cb)
    assert calls == [0, 1]


@pytest.mark.parametrize("kw", [dict(steps=0), dict(width=100, height=8), dict(width=8192, height=64),
                                dict(reference_method="diagonal"), dict(denoise=0.0), dict(denoise=1.5)])
def test_bad_arguments(ours, kw):
    with pytest.raises(InputError):
        ours.edit("x", [reference_image(64, 64, 0)], **{"width": 64, "height": 64, "resize_references": False, **kw})


def test_real_tokenizers_drive_tiny_encoders(tiny_models):
    """The tiny encoders keep the real vocabularies, so the release tokenizers can drive the whole tiny edit."""
    from kontext.text.tokenizers import PACKAGED

    found = {k: tiny_models[k] for k in ("dit", "vae", "clip_l", "t5xxl")}
    pipe = KontextPipeline.from_files(**found, tokenizers=PACKAGED, device="cpu")
    prompt = "Make it night, with a full moon 🌕 and neon signs (夜景)"
    ids = pipe.tokenizers.t5_ids([prompt])
    assert ids.max() > 1000  # real vocabulary ids, beyond anything the tiny tokenizer knows
    out = pipe.edit(prompt, [reference_image(64, 64, 0)], steps=1, width=64, height=64, resize_references=False)[0]
    assert out.size == (64, 64)


def test_num_images_matches_diffusers(ours, theirs):
    ref = reference_image(80, 64, 3)
    a = ours.edit("two of them", [ref], seed=7, steps=2, width=80, height=64, resize_references=False, num_images=2)
    b = theirs(image=ref, prompt="two of them", height=64, width=80, num_inference_steps=2, guidance_scale=2.5,
               generator=torch.Generator("cpu").manual_seed(7), max_area=80 * 64, _auto_resize=False,
               num_images_per_prompt=2, output_type="pil").images
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)).max() <= 2


def test_true_cfg_without_negative_prompt_is_plain_guidance_like_diffusers(ours, caplog):
    ref = reference_image(64, 64, 2)
    kw = dict(seed=1, steps=2, width=64, height=64, resize_references=False)
    plain = np.asarray(ours.edit("x", [ref], **kw)[0])
    with caplog.at_level("WARNING"):
        ignored = np.asarray(ours.edit("x", [ref], true_cfg=3.0, **kw)[0])
    assert np.array_equal(plain, ignored) and "negative prompt" in caplog.text
    empty_negative = np.asarray(ours.edit("x", [ref], true_cfg=3.0, negative_prompt="", **kw)[0])
    assert not np.array_equal(plain, empty_negative)


def test_sample_latent_batches_and_odd_reference_latents(ours):
    from kontext.pipeline import sample_latent

    txt, pooled = ours.encode(["a", "b"])
    odd = torch.randn(1, 16, 9, 7)  # e.g. ComfyUI's VAEEncode of a 72x56 image: padded like ComfyUI pads
    out = sample_latent(ours.dit, txt, pooled, ref_latents=[odd, torch.randn(2, 16, 8, 8)], width=64, height=32,
                        steps=1, num_images=2)
    assert out.shape == (4, 16, 4, 8) and torch.isfinite(out).all()
    with pytest.raises(InputError, match="batch"):
        sample_latent(ours.dit, txt, pooled[:1].repeat(3, 1), width=64, height=32, steps=1)


@pytest.mark.parametrize("kw", [dict(guidance=None), dict(guidance=float("nan")), dict(true_cfg="2"),
                                dict(denoise="0.5"), dict(num_images=2.5), dict(num_images=0), dict(callback=5)])
def test_sample_latent_rejects_bad_arguments(ours, kw):
    from kontext.pipeline import sample_latent

    txt, pooled = ours.encode(["a"])
    with pytest.raises(InputError):
        sample_latent(ours.dit, txt, pooled, width=64, height=32, steps=1, **kw)


def test_prompt_with_a_lone_surrogate(ours):
    assert ours.tokenizers.clip_ids("broken emoji \ud83d here").shape == (1, 77)


def test_cancel_leaves_nothing_of_the_run_alive(ours):
    """Even while the caller still holds the exception, the run's tensors are gone (so GPU memory can be freed)."""
    import weakref

    seen = []

    def cb(step, total, latent):
        seen.append(weakref.ref(latent))
        raise Cancelled("stop")

    with pytest.raises(Cancelled) as info:
        ours.edit("x", [reference_image(64, 64, 0)], steps=3, width=64, height=64, resize_references=False,
                  callback=cb)
    assert seen and seen[0]() is None, info.value  # checked while the exception (and its traceback) is held


def test_init_image_of_any_size_and_image_to_image_without_references(ours):
    big = np.zeros((4000, 6000, 3), np.uint8)
    out = ours.edit("x", [reference_image(64, 64, 0)], steps=2, width=64, height=64, resize_references=False,
                    init_image=big, denoise=0.5)[0]
    assert out.size == (64, 64)
    seen = {}

    import kontext.pipeline as P
    real = P.sample_latent

    def spy(*args, **kw):
        seen.update(size=(kw["width"], kw["height"]))
        return real(*args, **{**kw, "width": 64, "height": 64, "init_latent": None, "denoise": 1.0})

    P.sample_latent = spy
    try:
        ours.edit("x", [], steps=1, init_image=reference_image(300, 200, 0), denoise=0.5)
    finally:
        P.sample_latent = real
    assert seen["size"] == (1248, 832)  # the init image's preferred size, not 1024x1024
