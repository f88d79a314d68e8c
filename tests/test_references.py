"""Reference images: preferred sizes, loading awkward inputs, preparation, pixel conversions, output sizes."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from kontext.errors import InputError
from kontext.params import MAX_SIDE, MIN_SIDE
from kontext.references import (PREFERRED_RESOLUTIONS, load_image, output_size, preferred_size, prepare_reference,
                                to_pil, to_tensor)

diffusers = pytest.importorskip("diffusers")
from diffusers.image_processor import VaeImageProcessor  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS  # noqa: E402


def diffusers_choice(width: int, height: int) -> tuple[int, int]:
    """FluxKontextPipeline.__call__'s selection (BFL's and ComfyUI's use the same key)."""
    aspect = width / height
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return w, h


def rgb_pattern(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------- preferred sizes

def test_table_is_diffusers_table():
    assert list(PREFERRED_RESOLUTIONS) == list(PREFERRED_KONTEXT_RESOLUTIONS)


@pytest.mark.parametrize("size, expected", [
    ((1024, 1024), (1024, 1024)), ((512, 512), (1024, 1024)), ((6000, 4000), (1248, 832)),
    ((4000, 6000), (832, 1248)), ((1920, 1080), (1392, 752)), ((1080, 1920), (752, 1392)),
    ((1000, 1), (1568, 672)), ((1, 1000), (672, 1568)), ((800, 600), (1184, 880)), ((3000, 1000), (1568, 672)),
])
def test_preferred_size_table(size, expected):
    assert preferred_size(*size) == expected


def test_preferred_size_equals_diffusers_everywhere_including_ties():
    for w in range(16, 4097, 53):
        for h in range(16, 4097, 61):
            assert preferred_size(w, h) == diffusers_choice(w, h), (w, h)
    # aspect ratios exactly halfway between neighbours, where only the tie rule decides
    for (w1, h1), (w2, h2) in zip(PREFERRED_RESOLUTIONS, PREFERRED_RESOLUTIONS[1:]):
        mid = (w1 / h1 + w2 / h2) / 2
        for width, height in [(round(mid * 10000), 10000), (round(mid * 999), 999)]:
            assert preferred_size(width, height) == diffusers_choice(width, height)


def test_preferred_size_rejects_empty():
    with pytest.raises(InputError):
        preferred_size(0, 10)


# ---------------------------------------------------------------------------------------------- loading files

def test_grayscale_png(tmp_path):
    path = tmp_path / "grey.png"
    Image.fromarray(np.array([[0, 100], [200, 255]], dtype=np.uint8)).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (2, 2)
    assert np.array_equal(np.asarray(img)[..., 0], [[0, 100], [200, 255]])
    assert np.array_equal(np.asarray(img)[..., 0], np.asarray(img)[..., 2])


def test_rgba_composited_on_white_or_alpha_dropped(tmp_path):
    arr = np.zeros((1, 3, 4), dtype=np.uint8)
    arr[0, 0] = (0, 0, 0, 0)  # fully transparent, black underneath
    arr[0, 1] = (200, 10, 20, 255)  # opaque
    arr[0, 2] = (0, 0, 0, 128)  # half-transparent black
    path = tmp_path / "rgba.png"
    Image.fromarray(arr).save(path)
    out = np.asarray(load_image(path))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [200, 10, 20]
    assert all(abs(int(c) - 127) <= 1 for c in out[0, 2])
    dropped = np.asarray(load_image(path, background=None))  # what diffusers' .convert("RGB") gives
    assert dropped[0, 0].tolist() == [0, 0, 0] and dropped[0, 1].tolist() == [200, 10, 20]
    assert np.asarray(load_image(path, background=(0, 255, 0)))[0, 0].tolist() == [0, 255, 0]


def test_palette_with_transparency_and_la(tmp_path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    path = tmp_path / "pal.png"
    pal.save(path, transparency=0)
    out = np.asarray(load_image(path))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [255, 0, 0]
    la = Image.fromarray(np.array([[[50, 0], [50, 255]]], dtype=np.uint8), mode="LA")
    out = np.asarray(load_image(la))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [50, 50, 50]


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(np.array([[0, 257, 32896, 65535]], dtype=np.uint16)).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    out = np.asarray(load_image(path))[0, :, 0]
    assert out.tolist() == [0, 1, 128, 255]  # PIL's own convert("RGB") would give [0, 255, 255, 255]


def test_int32_and_float_pil_modes():
    assert np.asarray(load_image(Image.fromarray(np.array([[0, 65535, 70000]], dtype=np.int32))))[0, :, 0].tolist() \
        == [0, 255, 255]
    f = Image.fromarray(np.array([[0.0, 127.6, 300.0]], dtype=np.float32))
    assert np.asarray(load_image(f))[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, quality=100)
    img = load_image(path)
    r, g, b = np.asarray(img).reshape(-1, 3).mean(0)
    assert img.mode == "RGB" and r > 200 and g < 60 and b < 60  # cyan 0, magenta+yellow full: red


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red
    arr[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.png"
    Image.fromarray(arr).save(path, exif=exif)
    img = load_image(path)
    assert img.size == (20, 40)
    out = np.asarray(img)
    assert out[5, 10].tolist() == [255, 0, 0] and out[35, 10].tolist() == [0, 0, 255]  # left went to the top
    with Image.open(path) as im:
        assert load_image(im).size == (20, 40)  # also for an already opened PIL image


def test_missing_folder_text_and_truncated_files(tmp_path):
    with pytest.raises(InputError, match="nope.png: no such image file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(InputError, match="is a folder"):
        load_image(tmp_path)
    fake = tmp_path / "notes.png"
    fake.write_text("this is not a picture\n")
    with pytest.raises(InputError, match="notes.png: not an image file"):
        load_image(fake)
    good = tmp_path / "good.png"
    rgb_pattern(64, 64).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="cut.png"):
        load_image(str(cut))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.png"
    rgb_pattern(4, 4).save(path)
    path.chmod(0)
    try:
        with pytest.raises(InputError, match="locked.png"):
            load_image(path)
    finally:
        path.chmod(0o600)


def test_decompression_bomb_becomes_input_error(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (40, 40)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 px > 2 * 100: PIL refuses (restored afterwards)
    with pytest.raises(InputError, match="bomb.png: refused as a possible decompression bomb"):
        load_image(path)


# ---------------------------------------------------------------------------------------------- arrays, tensors

def test_numpy_arrays():
    grey = np.array([[0, 255]], dtype=np.uint8)
    assert np.asarray(load_image(grey))[0, 1].tolist() == [255, 255, 255]
    assert np.asarray(load_image(grey[..., None])).shape == (1, 2, 3)
    assert np.asarray(load_image(np.array([[65535, 257]], dtype=np.uint16)))[0, :, 0].tolist() == [255, 1]
    floats = np.array([[[0.0, 0.5, 1.0], [1.02, -0.01, 0.2]]], dtype=np.float64)  # small overshoots are clipped
    assert np.asarray(load_image(floats)).tolist() == [[[0, 128, 255], [255, 0, 51]]]
    rgba = np.zeros((1, 1, 4), dtype=np.uint8)
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(load_image(np.array([[True, False]])))[0, :, 0].tolist() == [255, 0]


@pytest.mark.parametrize("bad, match", [
    (np.zeros((4, 4, 2), dtype=np.uint8), "not an image"),
    (np.zeros(16, dtype=np.uint8), "not an image"),
    (np.zeros((0, 4, 3), dtype=np.uint8), "empty"),
    (np.full((2, 2, 3), -1.0), "0..1"),  # a -1..1 array
    (np.full((2, 2, 3), 200.0), "0..1"),  # a 0..255 float array
    (np.array([[np.nan, 0.5]]), "NaN"),
    (np.array([[300, 2]], dtype=np.int32), "0..255"),
    (np.array([["a"]]), "not an image"),
])
def test_bad_arrays(bad, match):
    with pytest.raises(InputError, match=match):
        load_image(bad)


def test_torch_tensors_in_comfyui_and_channel_first_layouts():
    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    as_float = torch.from_numpy(rgb).float() / 255
    for t in (as_float[None], as_float, as_float.permute(2, 0, 1), as_float.permute(2, 0, 1)[None],
              as_float.to(torch.bfloat16).float()):
        assert np.array_equal(np.asarray(load_image(t)), rgb)
    assert np.asarray(load_image(as_float.to(torch.bfloat16))).shape == (5, 7, 3)
    with pytest.raises(InputError, match="batch of 2"):
        load_image(as_float[None].repeat(2, 1, 1, 1))
    with pytest.raises(InputError, match="not an image"):
        load_image(torch.zeros(5, 7, 9))
    with pytest.raises(InputError, match="cannot use a list"):
        load_image([[0, 1]])


# ---------------------------------------------------------------------------------------------- preparation

def test_resize_equals_diffusers_preprocessing():
    proc = VaeImageProcessor(vae_scale_factor=16)  # as FluxKontextPipeline builds it
    for w, h in [(640, 480), (333, 777), (1000, 1000)]:
        src = rgb_pattern(w, h, seed=w)
        tw, th = diffusers_choice(w, h)
        ref_img = proc.resize(src, th, tw)
        ours = prepare_reference(src)
        assert ours.size == (tw, th)
        assert np.array_equal(np.asarray(ours), np.asarray(ref_img))
        assert torch.equal(to_tensor(ours), proc.preprocess(ref_img, th, tw))


def test_tiny_and_huge_references():
    tiny = rgb_pattern(8, 8)
    assert prepare_reference(tiny).size == (1024, 1024)  # upsampled
    with pytest.raises(InputError, match="minimum is 16x16"):
        prepare_reference(tiny, resize=False)
    huge = Image.new("RGB", (6000, 4000), (10, 200, 30))  # cheap: one colour, no file
    out = prepare_reference(huge)
    assert out.size == (1248, 832) and np.asarray(out)[400, 600].tolist() == [10, 200, 30]
    with pytest.raises(InputError, match="at most 4096"):
        prepare_reference(huge, resize=False)


def test_no_resize_center_crops_to_multiples_of_16():
    src = rgb_pattern(100, 70)
    out = prepare_reference(src, resize=False)
    assert out.size == (96, 64)
    assert np.array_equal(np.asarray(out), np.asarray(src)[3:67, 2:98])  # (70-64)//2 = 3 rows, (100-96)//2 = 2 cols
    exact = rgb_pattern(64, 32)
    assert np.array_equal(np.asarray(prepare_reference(exact, resize=False)), np.asarray(exact))


# ---------------------------------------------------------------------------------------------- pixels

def test_to_tensor_range_and_layout():
    img = Image.fromarray(np.array([[[0, 255, 51]]], dtype=np.uint8))
    t = to_tensor(img)
    assert t.shape == (1, 3, 1, 1) and t.dtype == torch.float32
    assert t.flatten().tolist() == [-1.0, 1.0, pytest.approx(2 * 51 / 255 - 1)]


def test_to_pil_rounds_exactly_like_diffusers_postprocess():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 17, 9, generator=gen) * 0.7  # includes values beyond [-1, 1]
    ties = (torch.arange(256, dtype=torch.float32) + 0.5) / 255 * 2 - 1  # near k + 0.5 after scaling
    x[0, 0, :, :] = ties[:153].reshape(17, 9)
    ref = VaeImageProcessor(vae_scale_factor=16).postprocess(x, output_type="pil")
    ours = to_pil(x)
    assert len(ours) == 2
    for a, b in zip(ours, ref):
        assert a.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))


def test_to_pil_nan_is_black_with_a_warning(caplog):
    x = torch.zeros(1, 3, 2, 2)
    x[0, :, 0, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="kontext.references"):
        img = to_pil(x)[0]
    assert np.asarray(img)[0, 0].tolist() == [0, 0, 0] and np.asarray(img)[1, 1].tolist() == [128, 128, 128]
    assert "NaN" in caplog.text
    with pytest.raises(InputError, match=r"\[B, 3, H, W\]"):
        to_pil(torch.zeros(3, 2, 2))


# ---------------------------------------------------------------------------------------------- output size

def test_output_size_defaults_rounding_and_range():
    assert output_size(None, None, (1248, 832)) == (1248, 832)
    assert output_size(None, None) == (1024, 1024)
    assert output_size(1000, 1030) == (992, 1024)  # floored, as diffusers and BFL do
    assert output_size(1024.0, 512) == (1024, 512)
    assert output_size(1024, None, (1248, 832)) == (1024, 672)  # 1024 * 832 / 1248 = 682.7 -> 683 -> 672
    assert output_size(None, 512) == (512, 512)
    assert output_size(MIN_SIDE, MAX_SIDE) == (MIN_SIDE, MAX_SIDE)  # the default range, ends included
    with pytest.raises(InputError, match=f"width {MIN_SIDE - 1} .*outside"):
        output_size(MIN_SIDE - 1, 1024)
    with pytest.raises(InputError, match=f"height {MAX_SIDE + 16} is outside"):
        output_size(1024, MAX_SIDE + 16)
    assert output_size(70, 1024) == (64, 1024)  # floored into the range: accepted
    with pytest.raises(InputError, match=f"width 63 .*48.* outside the supported {MIN_SIDE}..{MAX_SIDE}"):
        output_size(63, 1024)
    with pytest.raises(InputError, match="outside"):
        output_size(None, None, (48, 48))  # an unresized small reference gives no usable default
    for bad in (1024.5, True, "1024", -16):
        with pytest.raises(InputError):
            output_size(bad, 1024)


def test_premultiplied_grey_alpha_is_composited_like_la():
    from kontext.references import load_image

    la = Image.new("LA", (8, 8), (100, 128))
    assert load_image(la.convert("La")).getpixel((0, 0)) == load_image(la).getpixel((0, 0)) == (177, 177, 177)
