"""The node pack without ComfyUI: node metadata, and the node functions run on the tiny models (image in, image out).

ComfyUI's hooks (progress bar, previews, interrupt) are replaced by small fakes where a test needs them.
"""
from __future__ import annotations

import gc
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kontext
from kontext.errors import CheckpointError, InputError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import nodes  # noqa: E402  (the pack's node package, imported the way ComfyUI's pack __init__ does)
from nodes import cache, host  # noqa: E402

M = nodes.NODE_CLASS_MAPPINGS
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


@pytest.fixture(scope="module")
def models_dir(tiny_models) -> Path:
    return tiny_models["vae"].parents[1]


@pytest.fixture(autouse=True)
def tiny_env(models_dir, monkeypatch):
    """Model lists from the tiny models folder, tokenizers from its tokenizers/ (what ComfyUI provides inside it)."""
    monkeypatch.setenv(host.MODELS_ENV, str(models_dir))
    monkeypatch.setenv("KONTEXT_TOKENIZERS", str(models_dir / "tokenizers"))


@pytest.fixture(scope="module")
def loaded(models_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(host.MODELS_ENV, str(models_dir))
        mp.setenv("KONTEXT_TOKENIZERS", str(models_dir / "tokenizers"))
        dit, = M["KontextModelLoader"]().load("kontext-tiny.safetensors", "auto", "cpu")
        te, = M["KontextTextEncoderLoader"]().load("clip_l-tiny.safetensors", "t5xxl-tiny.safetensors", "cpu")
        vae, = M["KontextVAELoader"]().load("ae-tiny.safetensors", "cpu")
    return types.SimpleNamespace(dit=dit, te=te, vae=vae)


def rand_image(w: int, h: int, seed: int = 0) -> torch.Tensor:
    """An IMAGE [1, h, w, 3] holding exact 8-bit values (so PIL round trips are lossless)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8).astype(np.float32) / 255.0)


def edit(loaded, image, prompt="make it red", seed=1, steps=2, resize="keep", **sampler):
    cond, = M["KontextTextEncode"]().encode(loaded.te, prompt, 2.5)
    cond, ref_latent = M["KontextReferenceImage"]().add(cond, loaded.vae, image, resize, "offset")
    args = dict(seed=seed, steps=steps, guidance=0.0, true_cfg=1.0, width=0, height=0, denoise=1.0) | sampler
    latent, = M["KontextSampler"]().sample(loaded.dit, cond, **args)
    out, = M["KontextVAEDecode"]().decode(latent, loaded.vae)
    return out


# ---------------------------------------------------------------------------------------------- metadata

def test_every_node_is_documented_and_categorised():
    assert set(M) == set(nodes.NODE_DISPLAY_NAME_MAPPINGS)
    assert len(M) >= 9
    for name, cls in M.items():
        assert cls.CATEGORY.startswith("Kontext/"), name
        assert len(cls.DESCRIPTION) > 40, name
        assert callable(getattr(cls(), cls.FUNCTION)), name
        assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES, name
        assert len(getattr(cls, "OUTPUT_TOOLTIPS", ())) == len(cls.RETURN_TYPES), name
        assert len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES), name
        display = nodes.NODE_DISPLAY_NAME_MAPPINGS[name]
        assert "Kontext" in display and display[0].isupper(), display
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"}, name
        for group in ("required", "optional"):
            for inp, (typ, *opts) in spec.get(group, {}).items():
                options = opts[0] if opts else {}
                assert len(options.get("tooltip", "")) > 10, f"{name}.{inp} has no tooltip"
                if typ in ("INT", "FLOAT"):
                    assert options["min"] <= options["default"] <= options["max"], f"{name}.{inp}"
                if isinstance(typ, list) and "default" in options:
                    assert options["default"] in typ, f"{name}.{inp}"


def test_display_names_are_unique_and_readable():
    names = list(nodes.NODE_DISPLAY_NAME_MAPPINGS.values())
    assert len(set(names)) == len(names)
    assert all(2 <= len(n.split()) <= 7 for n in names)


def test_model_lists_come_from_the_models_folder():
    dits = M["KontextModelLoader"].INPUT_TYPES()["required"]["dit_name"][0]
    # The diffusers folder is offered as one entry, its shards are not.
    assert dits == ["kontext-tiny-diffusers/", "kontext-tiny-fp8_scaled.safetensors", "kontext-tiny.safetensors"]
    assert M["KontextVAELoader"].INPUT_TYPES()["required"]["vae_name"][0] == ["ae-tiny.safetensors"]
    encoders = M["KontextTextEncoderLoader"].INPUT_TYPES()["required"]["clip_name"][0]
    assert encoders == ["clip_l-tiny.safetensors", "t5xxl-tiny.safetensors"]


def test_without_models_the_lists_are_empty_not_an_error(monkeypatch):
    monkeypatch.delenv(host.MODELS_ENV)
    assert M["KontextModelLoader"].INPUT_TYPES()["required"]["dit_name"][0] == []


# ---------------------------------------------------------------------------------------------- running

def test_image_in_image_out(loaded):
    out = edit(loaded, rand_image(300, 260))
    assert out.shape == (1, 256, 288, 3)  # keep: center-cropped to multiples of 16
    assert out.dtype == torch.float32 and 0.0 <= out.min() and out.max() <= 1.0
    assert out.std() > 0.01  # a picture, not a constant


def test_nodes_give_the_same_image_as_the_library(loaded, models_dir, tmp_path):
    image = rand_image(272, 304, seed=3)
    Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8)).save(tmp_path / "ref.png")
    pipe = kontext.KontextPipeline.from_models_dir(models_dir, device="cpu", precision="fp32")
    expected = pipe.edit("make it red", [tmp_path / "ref.png"], seed=5, steps=2, resize_references=False)[0]
    ours = edit(loaded, image, seed=5)
    got = (ours[0].numpy() * 255).round().astype(np.int16)
    # Same engine calls on the same fp32 weights; the only difference is where pixels are rounded to 8 bits.
    assert np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1


def test_same_seed_same_image_other_seed_other_image(loaded):
    image = rand_image(256, 256)
    a, b, c = edit(loaded, image, seed=1), edit(loaded, image, seed=1), edit(loaded, image, seed=2)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_two_references_text_to_image_and_preferred_resize(loaded):
    cond, = M["KontextTextEncode"]().encode(loaded.te, "put them together", 2.5)
    cond, _ = M["KontextReferenceImage"]().add(cond, loaded.vae, rand_image(256, 256), "keep", "index")
    cond, lat = M["KontextReferenceImage"]().add(cond, loaded.vae, rand_image(256, 320, 1), "preferred", "index")
    assert len(cond[0][1]["reference_latents"]) == 2
    w, h = kontext.references.preferred_size(256, 320)
    assert lat["samples"].shape[-2:] == (h // 8, w // 8)
    latent, = M["KontextSampler"]().sample(loaded.dit, cond, 0, 1, 0.0, 1.0, 0, 0, 1.0)
    assert latent["samples"].shape == (1, 16, 32, 32)  # size of the first reference
    t2i, = M["KontextTextEncode"]().encode(loaded.te, "a bicycle", 2.5)
    latent, = M["KontextSampler"]().sample(loaded.dit, t2i, 0, 1, 0.0, 1.0, 256, 384, 1.0)
    assert latent["samples"].shape == (1, 16, 48, 32)


def test_true_cfg_and_img2img_through_the_latent_input(loaded):
    image = rand_image(256, 256)
    cond, = M["KontextTextEncode"]().encode(loaded.te, "make it red", 2.5)
    neg, = M["KontextTextEncode"]().encode(loaded.te, "", 2.5)
    cond, ref = M["KontextReferenceImage"]().add(cond, loaded.vae, image, "keep", "offset")
    a, = M["KontextSampler"]().sample(loaded.dit, cond, 0, 2, 0.0, 1.0, 0, 0, 1.0)
    b, = M["KontextSampler"]().sample(loaded.dit, cond, 0, 2, 0.0, 3.0, 0, 0, 1.0, negative=neg)
    assert (a["samples"] - b["samples"]).abs().max() > 1e-4  # the negative pass changed the result
    start, = M["KontextVAEEncode"]().encode(image, loaded.vae)
    c, = M["KontextSampler"]().sample(loaded.dit, cond, 0, 4, 0.0, 1.0, 0, 0, 0.5, latent=start)
    assert c["samples"].shape == start["samples"].shape


def test_conditioning_options_reach_the_engine(loaded, monkeypatch):
    seen = {}

    def fake_sample(dit, txt, pooled, **kw):
        seen.update(kw)
        return torch.zeros(kw["num_images"], 16, kw["height"] // 8, kw["width"] // 8)

    monkeypatch.setattr("kontext.pipeline.sample_latent", fake_sample)
    cond, = M["KontextTextEncode"]().encode(loaded.te, "x", 4.0)
    sampler = M["KontextSampler"]()
    sampler.sample(loaded.dit, cond, 0, 3, 0.0, 1.0, 0, 0, 1.0)
    assert seen["guidance"] == 4.0 and (seen["width"], seen["height"]) == (1024, 1024)  # from the conditioning
    sampler.sample(loaded.dit, cond, 0, 3, 3.5, 1.0, 512, 0, 1.0)
    assert seen["guidance"] == 3.5 and (seen["width"], seen["height"]) == (512, 512)  # the widget wins
    # ComfyUI's nodes write the same keys: FluxGuidance sets "guidance", ReferenceLatent appends a raw latent,
    # FluxKontextMultiReferenceLatentMethod sets the method.
    comfy_cond = [[cond[0][0], {**cond[0][1], "guidance": None, "reference_latents": [torch.zeros(1, 16, 40, 32)],
                                "reference_latents_method": "index"}]]
    sampler.sample(loaded.dit, comfy_cond, 0, 3, 0.0, 1.0, 0, 0, 1.0)
    assert seen["guidance"] == 2.5 and seen["reference_method"] == "index"
    assert (seen["width"], seen["height"]) == (256, 320)  # from the first reference latent
    latent = {"samples": torch.zeros(2, 16, 48, 32)}
    sampler.sample(loaded.dit, cond, 0, 3, 0.0, 1.0, 0, 0, 1.0, latent=latent)
    assert seen["num_images"] == 2 and (seen["width"], seen["height"]) == (256, 384)
    assert seen["init_latent"] is None  # denoise 1: the latent only gives size and batch


def test_reference_node_does_not_change_its_input(loaded):
    cond, = M["KontextTextEncode"]().encode(loaded.te, "x", 2.5)
    before = dict(cond[0][1])
    out, _ = M["KontextReferenceImage"]().add(cond, loaded.vae, rand_image(256, 256), "keep", "offset")
    assert cond[0][1] == before and "reference_latents" not in cond[0][1]  # ComfyUI caches outputs: no mutation
    assert len(out[0][1]["reference_latents"]) == 1


def test_batch_of_images_gives_one_reference_each(loaded):
    cond, = M["KontextTextEncode"]().encode(loaded.te, "x", 2.5)
    batch = torch.cat([rand_image(256, 256, 0), rand_image(256, 256, 1)])
    out, lat = M["KontextReferenceImage"]().add(cond, loaded.vae, batch, "keep", "offset")
    assert len(out[0][1]["reference_latents"]) == 2 and lat["samples"].shape[0] == 2


def test_comfyui_vae_objects_are_accepted(loaded):
    class ComfyVAE:  # ComfyUI's VAE: IMAGE in, raw latent out, and back
        def encode(self, image):
            self.encoded = image.shape
            return torch.zeros(image.shape[0], 16, image.shape[1] // 8, image.shape[2] // 8)

        def decode(self, latent):
            return torch.full((latent.shape[0], latent.shape[2] * 8, latent.shape[3] * 8, 3), 0.5)

    vae = ComfyVAE()
    cond, = M["KontextTextEncode"]().encode(loaded.te, "x", 2.5)
    out, lat = M["KontextReferenceImage"]().add(cond, vae, rand_image(256, 256), "keep", "offset")
    assert vae.encoded == (1, 256, 256, 3) and lat["samples"].shape == (1, 16, 32, 32)
    img, = M["KontextVAEDecode"]().decode(lat, vae)
    assert img.shape == (1, 256, 256, 3)


def test_vae_encode_crops_to_16_and_decode_roundtrips_shape(loaded):
    lat, = M["KontextVAEEncode"]().encode(rand_image(270, 250), loaded.vae)
    assert lat["samples"].shape == (1, 16, 240 // 8, 256 // 8)
    img, = M["KontextVAEDecode"]().decode(lat, loaded.vae)
    assert img.shape == (1, 240, 256, 3)


@pytest.mark.parametrize("size,fit", [((640, 480), "stretch"), ((640, 480), "crop"), ((300, 900), "crop")])
def test_image_scale_picks_the_preferred_resolution(size, fit):
    out, = M["KontextImageScale"]().scale(rand_image(*size), fit)
    want = kontext.references.preferred_size(*size)
    assert (out.shape[2], out.shape[1]) == want


def test_progress_previews_and_cancel(loaded, monkeypatch):
    """ComfyUI's hooks: one progress update per step with a preview, and Cancel stops the run between steps."""
    updates, checks = [], []

    class Interrupted(Exception):
        pass

    def interrupt_check():
        checks.append(1)
        if cancel_after and len(checks) > cancel_after:
            raise Interrupted()

    fake = {
        "comfy.model_management": types.SimpleNamespace(throw_exception_if_processing_interrupted=interrupt_check),
        "comfy.utils": types.SimpleNamespace(ProgressBar=lambda total: types.SimpleNamespace(
            update_absolute=lambda v, t, p: updates.append((v, t, p)))),
        "comfy.latent_formats": types.SimpleNamespace(Flux=lambda: types.SimpleNamespace(
            process_in=lambda x: (x - 0.1159) * 0.3611)),
        "latent_preview": types.SimpleNamespace(get_previewer=lambda device, fmt: types.SimpleNamespace(
            decode_latent_to_preview_image=lambda f, x0: ("JPEG", tuple(x0.shape), 512))),
    }
    monkeypatch.setattr(host, "comfy", lambda name: fake.get(name))
    cancel_after = 0
    edit(loaded, rand_image(256, 256), steps=3)
    assert [(v, t) for v, t, _ in updates] == [(1, 3), (2, 3), (3, 3)]
    assert all(p == ("JPEG", (1, 16, 32, 32), 512) for _, _, p in updates)
    cancel_after, updates[:], checks[:] = 2, [], []
    with pytest.raises(Interrupted):
        edit(loaded, rand_image(256, 256), steps=50)
    assert len(updates) < 3  # stopped within a step of the request, not after 50
    cancel_after = 0
    assert edit(loaded, rand_image(256, 256), steps=1).shape == (1, 256, 256, 3)  # and the models still work


# ---------------------------------------------------------------------------------------------- caching

def test_models_are_cached_until_the_file_changes(models_dir, tmp_path, monkeypatch):
    for sub in ("vae", "diffusion_models", "text_encoders"):
        (tmp_path / sub).mkdir()
    vae_file = tmp_path / "vae" / "ae.safetensors"
    vae_file.write_bytes((models_dir / "vae" / "ae-tiny.safetensors").read_bytes())
    monkeypatch.setenv(host.MODELS_ENV, str(tmp_path))
    loader = M["KontextVAELoader"]
    a, = loader().load("ae.safetensors", "cpu")
    b, = loader().load("ae.safetensors", "cpu")
    assert a is b  # same file, same options: no reload
    changed = loader.IS_CHANGED("ae.safetensors", "cpu")
    assert changed == loader.IS_CHANGED("ae.safetensors", "cpu")
    st = vae_file.stat()
    os.utime(vae_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file was rewritten
    assert loader.IS_CHANGED("ae.safetensors", "cpu") != changed  # ComfyUI re-runs the loader ...
    c, = loader().load("ae.safetensors", "cpu")
    assert c is not a  # ... which reads the file again
    live = cache.live_entries()
    del a, b, c
    gc.collect()
    assert cache.live_entries() < live  # nothing but the user (ComfyUI's output cache) keeps a model alive


# ---------------------------------------------------------------------------------------------- bad input

def test_missing_model_file_names_the_folder():
    with pytest.raises(InputError, match=r"not found in models/diffusion_models; searched: .*diffusion_models"):
        M["KontextModelLoader"]().load("nope.safetensors", "auto", "cpu")
    with pytest.raises(InputError, match="not a path"):
        M["KontextVAELoader"]().load("../vae/ae-tiny.safetensors", "cpu")


def test_wrong_model_kind_in_a_loader(models_dir, tmp_path, monkeypatch):
    (tmp_path / "diffusion_models").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "diffusion_models" / "ae.safetensors").write_bytes((models_dir / "vae" / "ae-tiny.safetensors")
                                                                   .read_bytes())
    (tmp_path / "vae" / "dit.safetensors").write_bytes((models_dir / "diffusion_models" / "kontext-tiny.safetensors")
                                                       .read_bytes())
    monkeypatch.setenv(host.MODELS_ENV, str(tmp_path))
    with pytest.raises(CheckpointError, match="not a Flux DiT.*VAE"):
        M["KontextModelLoader"]().load("ae.safetensors", "auto", "cpu")
    with pytest.raises(CheckpointError, match="dit.safetensors"):
        M["KontextVAELoader"]().load("dit.safetensors", "cpu")


def test_mixed_size_image_batch_is_refused(loaded):
    cond, = M["KontextTextEncode"]().encode(loaded.te, "x", 2.5)
    mixed = [rand_image(256, 256), rand_image(320, 256)]
    with pytest.raises(InputError, match=r"mixes image sizes \(256x256, 320x256\)"):
        M["KontextReferenceImage"]().add(cond, loaded.vae, mixed, "keep", "offset")


@pytest.mark.parametrize("kwargs,message", [
    (dict(true_cfg=2.0), "needs the negative input"),
    (dict(denoise=0.5), "needs the latent input"),
    (dict(width=40), "outside the supported"),
    (dict(latent={"samples": torch.zeros(1, 16, 32, 32)}, width=512), "set both to 0"),
    (dict(latent={"samples": torch.zeros(1, 4, 32, 32)}), "Flux LATENT"),
])
def test_sampler_explains_bad_settings(loaded, kwargs, message):
    cond, = M["KontextTextEncode"]().encode(loaded.te, "x", 2.5)
    args = dict(seed=0, steps=1, guidance=0.0, true_cfg=1.0, width=0, height=0, denoise=1.0) | kwargs
    with pytest.raises(InputError, match=message):
        M["KontextSampler"]().sample(loaded.dit, cond, **args)


def test_conditioning_from_elsewhere_is_checked(loaded):
    with pytest.raises(InputError, match="no pooled CLIP vector"):
        M["KontextSampler"]().sample(loaded.dit, [[torch.zeros(1, 512, 64), {}]], 0, 1, 0.0, 1.0, 0, 0, 1.0)
    with pytest.raises(InputError, match="expected a CONDITIONING"):
        M["KontextSampler"]().sample(loaded.dit, None, 0, 1, 0.0, 1.0, 0, 0, 1.0)
    with pytest.raises(InputError, match="not supported"):
        bad = [[torch.zeros(1, 512, 64), {"pooled_output": torch.zeros(1, 64), "reference_latents_method": "uxo"}]]
        M["KontextSampler"]().sample(loaded.dit, bad, 0, 1, 0.0, 1.0, 0, 0, 1.0)
    with pytest.raises(InputError, match="device policy"):
        M["KontextVAELoader"]().load("ae-tiny.safetensors", "gpu0")


def test_latent_from_comfyuis_vae_encode_of_any_size_is_followed(loaded):
    """ComfyUI's VAEEncode crops to multiples of 8 (a 1000x1000 image gives 125x125): the sampler follows it."""
    cond, = M["KontextTextEncode"]().encode(loaded.te, "x", 2.5)
    for h, w in [(125, 125), (27, 41)]:
        latent = {"samples": torch.randn(1, 16, h, w)}
        out, = M["KontextSampler"]().sample(loaded.dit, cond, 0, 2, 0.0, 1.0, 0, 0, 0.6, latent=latent)
        assert out["samples"].shape == (1, 16, h, w) and torch.isfinite(out["samples"]).all()


@pytest.mark.parametrize("opts,message", [
    ({"start_percent": 0.2}, "start_percent"), ({"area": (8, 8, 0, 0)}, "area"), ({"strength": 0.5}, "strength"),
    ({"mask": torch.ones(1, 8, 8)}, "mask")])
def test_unsupported_conditioning_options_are_refused_not_ignored(loaded, opts, message):
    (tokens, base), = M["KontextTextEncode"]().encode(loaded.te, "x", 2.5)[0]
    with pytest.raises(InputError, match=message):
        M["KontextSampler"]().sample(loaded.dit, [[tokens, {**base, **opts}]], 0, 1, 0.0, 1.0, 64, 64, 1.0)


def test_combined_or_foreign_conditioning_gets_a_clear_error(loaded):
    cond, = M["KontextTextEncode"]().encode(loaded.te, "x", 2.5)
    with pytest.raises(InputError, match="ConditioningCombine"):
        M["KontextSampler"]().sample(loaded.dit, cond + cond, 0, 1, 0.0, 1.0, 64, 64, 1.0)
    sdxl_like = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    with pytest.raises(InputError, match="does not fit this model"):
        M["KontextSampler"]().sample(loaded.dit, sdxl_like, 0, 1, 0.0, 1.0, 64, 64, 1.0)
