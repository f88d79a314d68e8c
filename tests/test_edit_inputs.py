"""Bad and unusual input through the whole edit: image kinds, sizes, prompts, output sizes, steps, paths.

Every case runs KontextPipeline.edit on the tiny models at 64x64 (about 0.2 s an edit on CPU) and either gets an image
whose content shows the input was understood, or an InputError that says what was wrong. References are used at their
own size (resize_references=False) unless the resize is the point; resizing tests shrink the preferred-size table so
the tiny VAE does not have to encode a 1024x1024 picture.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from kontext import references
from kontext.errors import InputError
from kontext.pipeline import KontextPipeline

SIZE = 64  # output side: 16 target tokens, the smallest allowed


@pytest.fixture(scope="module")
def pipe(tiny_models) -> KontextPipeline:
    return KontextPipeline.from_models_dir(tiny_models["dit"].parents[1], device="cpu")


def edit(pipe: KontextPipeline, prompt: str = "make the cat red", refs=(), **kw) -> Image.Image:
    kw = {"seed": 3, "steps": 1, "resize_references": False, **kw}
    images = pipe.edit(prompt, list(refs), **kw)
    assert len(images) == 1
    return images[0]


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def gradient(w: int = SIZE, h: int = SIZE) -> np.ndarray:
    """An RGB uint8 picture with structure on both axes (a flat colour would hide transposes and crops)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 255 // (w + h - 2)],
                    -1).astype(np.uint8)


def test_the_reference_matters(pipe):
    # Guards the equality tests below: if the reference had no influence, "same output" would prove nothing.
    a = edit(pipe, refs=[Image.fromarray(gradient())])
    b = edit(pipe, refs=[Image.fromarray(255 - gradient())])
    assert np.abs(pixels(a) - pixels(b)).max() > 0


# ---------------------------------------------------------------------------------------------- image kinds
# Each file on disk must give exactly the edit of the RGB picture a viewer would show for it.

def _grey(tmp_path):
    arr = gradient()[..., 0]
    Image.fromarray(arr, "L").save(tmp_path / "grey.png")
    return tmp_path / "grey.png", np.repeat(arr[..., None], 3, -1)


def _rgba(tmp_path):
    rgb = gradient()
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, : SIZE // 2] = 0  # the left half fully transparent: must show as white, not as the hidden colour
    alpha[:8, SIZE // 2:] = 128
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    a = alpha[..., None].astype(np.float64) / 255
    return tmp_path / "rgba.png", np.round(rgb * a + 255 * (1 - a)).astype(np.uint8)


def _palette(tmp_path):
    img = Image.fromarray(gradient()).quantize(colors=16)
    assert img.mode == "P"
    img.save(tmp_path / "palette.png")
    return tmp_path / "palette.png", np.asarray(img.convert("RGB"))


def _grey16(tmp_path):
    arr16 = (np.arange(SIZE * SIZE, dtype=np.uint32).reshape(SIZE, SIZE) * 16).astype(np.uint16)  # 0..65520
    Image.fromarray(arr16).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode in ("I;16", "I")
    grey = np.round(arr16 / 257.0).astype(np.uint8)  # scaled, not clipped at 255 as PIL's convert("L") would
    return tmp_path / "grey16.png", np.repeat(grey[..., None], 3, -1)


@pytest.mark.parametrize("make, tol", [(_grey, 0), (_palette, 0), (_grey16, 0), (_rgba, 1)],
                         ids=["L", "P", "I;16", "RGBA"])
def test_image_modes(pipe, tmp_path, make, tol):
    path, expected_rgb = make(tmp_path)
    prepared = references.prepare_reference(path, resize=False)
    assert prepared.mode == "RGB" and prepared.size == (SIZE, SIZE)
    # tol: PIL's integer alpha compositing may round half-way values the other way than the float formula above.
    assert np.abs(pixels(prepared) - expected_rgb.astype(np.int16)).max() <= tol
    out = edit(pipe, refs=[path])
    assert out.mode == "RGB" and out.size == (SIZE, SIZE)  # output size follows the reference
    assert np.array_equal(pixels(out), pixels(edit(pipe, refs=[Image.fromarray(pixels(prepared).astype(np.uint8))])))


def test_palette_with_transparency(pipe, tmp_path):
    img = Image.fromarray(gradient()).quantize(colors=8)
    img.info["transparency"] = 0
    img.save(tmp_path / "ptrans.png", transparency=0)
    prepared = references.prepare_reference(tmp_path / "ptrans.png", resize=False)
    index0 = np.asarray(Image.open(tmp_path / "ptrans.png")) == 0
    assert index0.any() and (pixels(prepared)[index0] == 255).all()  # transparent palette entry shows white
    assert edit(pipe, refs=[tmp_path / "ptrans.png"]).size == (SIZE, SIZE)


def test_exif_rotated_jpeg(pipe, tmp_path):
    stored = Image.fromarray(gradient(96, 64))  # 96 wide, 64 high as stored
    exif = stored.getexif()
    exif[0x0112] = 6  # orientation 6: a viewer turns it 90 degrees clockwise
    stored.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    out = edit(pipe, refs=[tmp_path / "phone.jpg"])
    assert out.size == (64, 96)  # upright: the rotation was applied before the size was taken
    # The decoded pixels turned clockwise by hand (an array carries no EXIF tag to apply a second time).
    upright = np.rot90(np.asarray(Image.open(tmp_path / "phone.jpg")), k=-1)
    assert np.array_equal(pixels(out), pixels(edit(pipe, refs=[np.ascontiguousarray(upright)])))


def test_tiny_image_without_resize_is_refused(pipe):
    with pytest.raises(InputError, match="16"):
        edit(pipe, refs=[Image.fromarray(gradient(8, 8))])


def test_tiny_image_is_upsampled(pipe, monkeypatch):
    small = Image.fromarray(gradient(8, 8))
    assert references.prepare_reference(small, resize=True).size == (1024, 1024)
    # The edit itself with a one-entry table: same code path, without a slow 1024x1024 VAE encode on CPU.
    monkeypatch.setattr(references, "PREFERRED_RESOLUTIONS", ((SIZE, SIZE),))
    assert edit(pipe, refs=[small], resize_references=True).size == (SIZE, SIZE)


def test_huge_image(pipe, monkeypatch):
    huge = Image.new("RGB", (6000, 4000), (30, 120, 200))
    assert references.prepare_reference(huge, resize=True).size == (1248, 832)
    with pytest.raises(InputError, match="at most 4096"):
        edit(pipe, refs=[huge])  # without resizing: 6000 px is over the per-side limit
    monkeypatch.setattr(references, "PREFERRED_RESOLUTIONS", ((64, 64), (96, 64), (64, 96)))
    assert edit(pipe, refs=[huge], resize_references=True).size == (96, 64)  # nearest aspect ratio, 3:2


# ---------------------------------------------------------------------------------------------- prompts

@pytest.mark.parametrize("prompt", ["", "   \n\t"], ids=["empty", "whitespace"])
def test_empty_prompts(pipe, prompt):
    out = edit(pipe, prompt, width=SIZE, height=SIZE)
    assert out.size == (SIZE, SIZE)
    assert np.array_equal(pixels(out), pixels(edit(pipe, "", width=SIZE, height=SIZE)))  # both mean "no text"


def test_over_long_prompt_is_truncated_with_a_warning(pipe, caplog):
    prompt = " ".join(["a red cat sits on the old wooden chair"] * 250)  # 2000 words
    with caplog.at_level(logging.WARNING):
        out = edit(pipe, prompt, width=SIZE, height=SIZE)
    assert out.size == (SIZE, SIZE)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("T5" in m and "dropped" in m and "512" in m for m in warned), warned
    assert any("CLIP" in m and "dropped" in m and "77" in m for m in warned), warned


@pytest.mark.parametrize("prompt", ["把汽车变成红色", "اجعل السيارة حمراء", "make it 🌙 night 🚗🔥"],
                         ids=["CJK", "Arabic", "emoji"])
def test_non_latin_prompts(pipe, prompt):
    txt, pooled = pipe.encode([prompt])
    empty_txt, _ = pipe.encode([""])
    assert not np.array_equal(txt.numpy(), empty_txt.numpy())  # the text was not silently dropped
    out = edit(pipe, prompt, width=SIZE, height=SIZE)
    assert out.size == (SIZE, SIZE)


def test_prompt_must_be_a_string(pipe):
    with pytest.raises(InputError, match="prompt"):
        pipe.edit(None, [], width=SIZE, height=SIZE, steps=1)


# ---------------------------------------------------------------------------------------------- output size, steps

def test_odd_sizes_are_floored_to_16(pipe):
    assert edit(pipe, width=100, height=70).size == (96, 64)


def test_one_side_follows_the_reference_aspect(pipe):
    ref = Image.fromarray(gradient(128, 64))
    assert edit(pipe, refs=[ref], width=200).size == (192, 96)  # height 100 from the 2:1 aspect; both floored


@pytest.mark.parametrize("size", [{"width": 8192, "height": SIZE}, {"width": SIZE, "height": 8192},
                                  {"width": 32, "height": SIZE}, {"width": SIZE, "height": 32},
                                  {"width": 63, "height": SIZE}],
                         ids=["w8192", "h8192", "w32", "h32", "w63-floors-to-48"])
def test_sizes_out_of_range(pipe, size):
    (name, bad), = [(k, v) for k, v in size.items() if v != SIZE]
    with pytest.raises(InputError, match=rf"{name} {bad}.*64\.\.4096"):
        edit(pipe, **size)


@pytest.mark.parametrize("size", [{"width": 0, "height": SIZE}, {"width": -64, "height": SIZE},
                                  {"width": 64.5, "height": SIZE}, {"width": "64", "height": SIZE}])
def test_sizes_not_whole_positive_numbers(pipe, size):
    with pytest.raises(InputError, match="width"):
        edit(pipe, **size)


@pytest.mark.parametrize("steps", [0, -1])
def test_steps_below_one(pipe, steps):
    with pytest.raises(InputError, match=rf"steps.*{steps}"):
        edit(pipe, steps=steps, width=SIZE, height=SIZE)


def test_steps_not_an_integer(pipe):
    with pytest.raises(InputError, match="steps"):
        edit(pipe, steps=2.5, width=SIZE, height=SIZE)


# ---------------------------------------------------------------------------------------------- paths

def test_missing_image_path(pipe, tmp_path):
    missing = tmp_path / "nowhere" / "cat.png"
    with pytest.raises(InputError, match="no such image") as err:
        edit(pipe, refs=[missing])
    assert str(missing) in str(err.value)


def test_missing_path_as_a_plain_string(pipe, tmp_path):
    # A bare string (not a list) is one reference, not a sequence of one-letter paths.
    with pytest.raises(InputError) as err:
        pipe.edit("x", str(tmp_path / "cat.png"), steps=1, resize_references=False)
    assert str(tmp_path / "cat.png") in str(err.value)


def test_folder_as_image(pipe, tmp_path):
    folder = tmp_path / "photos.png"
    folder.mkdir()
    with pytest.raises(InputError, match="folder") as err:
        edit(pipe, refs=[folder])
    assert str(folder) in str(err.value)


@pytest.mark.parametrize("content", [b"this is not a picture\n", b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 20],
                         ids=["text", "empty", "truncated-png"])
def test_file_that_is_not_an_image(pipe, tmp_path, content):
    fake = tmp_path / "cat.png"
    fake.write_bytes(content)
    with pytest.raises(InputError) as err:
        edit(pipe, refs=[fake])
    assert str(fake) in str(err.value)
