"""Images in and out of the engine: loading anything image-like, Kontext's preferred sizes, pixels <-> tensors.

Decisions (each also noted where it is made):
- Transparency is composited onto white by default, because that is what a user saw in a viewer or browser; the
  references (diffusers' `load_image`, ComfyUI's LoadImage) drop alpha instead, exposing whatever colour hides
  under transparent pixels (often black). `background=None` gives their behaviour.
- With `resize=True` a reference is stretched (Lanczos) to the nearest of the 17 preferred sizes, as BFL's and
  diffusers' pipelines do. ComfyUI's FluxKontextImageScale picks the same size but center-crops to its aspect first.
- With `resize=False` the size is floored to a multiple of 16 by center-cropping (at most 15 pixels per axis, no
  resampling blur), like ComfyUI's VAEEncode crop; diffusers instead resamples to the floored size.
- Output sizes are floored to multiples of 16, as diffusers and BFL do; sides must lie in 64..4096 (smaller is a
  typo more often than a wish; larger exceeds any GPU).
- Pixels -> PIL rounds like diffusers' VaeImageProcessor.postprocess, so float32 decodes give identical bytes.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError
from .params import MAX_SIDE, MULTIPLE, integer, side

logger = logging.getLogger(__name__)

# (width, height) pairs Kontext was trained on (BFL's list, also in diffusers and ComfyUI); all multiples of 16.
PREFERRED_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024),
    (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688), (1568, 672),
)
DEFAULT_SIZE = (1024, 1024)  # output size with neither a reference nor an explicit size
WHITE = (255, 255, 255)

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
_GREY16_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def preferred_size(width: int, height: int) -> tuple[int, int]:
    """The preferred (w, h) whose aspect ratio is nearest to width/height.

    The key (distance, w, h) is the one BFL, diffusers and ComfyUI all minimise: an exact tie on the distance goes
    to the smaller width, which is the earlier table entry, so "first in the table" and diffusers cannot disagree.
    """
    if width < 1 or height < 1:
        raise InputError(f"image size {width}x{height} is empty")
    aspect = width / height
    return min(PREFERRED_RESOLUTIONS, key=lambda wh: (abs(aspect - wh[0] / wh[1]), wh[0], wh[1]))


# ---------------------------------------------------------------------------------------------- loading

def load_image(src: ImageLike, background: tuple[int, int, int] | None = WHITE) -> Image.Image:
    """Any image-like input as an 8-bit RGB PIL image, upright per its EXIF orientation.

    Accepts a path, a PIL image, a numpy array (HxW or HxWxC with C in 1/3/4; uint8, uint16, bool, or float in 0..1)
    or a torch tensor ([H,W,C], [C,H,W], or a single-image batch such as ComfyUI's IMAGE [1,H,W,C] float 0..1).
    Transparent pixels are composited onto `background` (None drops alpha, as diffusers and ComfyUI do).
    """
    if isinstance(src, (str, os.PathLike)):
        img = _open(Path(src).expanduser())
    elif isinstance(src, Image.Image):
        img = _exif_upright(src, "the image")
    elif isinstance(src, torch.Tensor):
        img = _from_array(_tensor_as_hwc(src), "tensor")
    elif isinstance(src, np.ndarray):
        img = _from_array(src, "array")
    else:
        raise InputError(f"cannot use a {type(src).__name__} as an image: pass a file path, a PIL image, "
                         "a numpy array or a torch tensor")
    return _to_rgb(img, background)


def _open(path: Path) -> Image.Image:
    if not path.exists():
        raise InputError(f"{path}: no such image file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not an image file")
    try:
        # Above Image.MAX_IMAGE_PIXELS (a 10000x10000 photo) PIL prints a raw warnings-module message, from open()
        # or from a plugin's load(); one line of ours, through logging, says it instead. Twice the limit raises.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                pixels, limit = im.width * im.height, Image.MAX_IMAGE_PIXELS  # limit None: check switched off
                if limit is not None and pixels > limit:
                    logger.warning("%s is %dx%d (%.0f megapixels, above PIL's %.0f-megapixel limit for untrusted "
                                   "images): decoding it needs about %.1f GB; a downscaled copy edits as well",
                                   path, im.width, im.height, pixels / 1e6, limit / 1e6, pixels * 3 / 1e9)
                im.load()  # decode now, inside the try: a truncated file fails here rather than later
                return _exif_upright(im, str(path))
    except Image.DecompressionBombError as exc:
        # PIL's guard against images that expand to gigabytes; we keep the limit and explain it.
        raise InputError(f"{path}: refused as a possible decompression bomb ({exc}). Downscale the image first; "
                         "PIL's limit is Image.MAX_IMAGE_PIXELS") from None
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image file (PIL cannot identify its format)") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or damaged data, unreadable file
        raise InputError(f"{path}: cannot be read as an image ({exc})") from None


def _exif_upright(img: Image.Image, what: str) -> Image.Image:
    """A copy rotated/flipped per the EXIF orientation tag, which phones set instead of rotating pixels."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception as exc:  # a damaged EXIF block must not make a readable picture unusable
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", what, exc)
        return img.copy()


def _to_rgb(img: Image.Image, background: tuple[int, int, int] | None) -> Image.Image:
    if img.mode in _GREY16_MODES:
        # PIL's own conversion clips 16-bit values at 255 (an almost white picture); scale 0..65535 to 0..255.
        grey = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8))
    elif img.mode == "F":
        # PIL's convention for float images is the 0..255 scale of "L" (its own F -> L conversion clips there).
        grey = np.nan_to_num(np.asarray(img, dtype=np.float64))
        img = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8))
    if img.mode == "La":  # premultiplied grey + alpha: PIL converts it to RGBA only by way of LA
        img = img.convert("LA")
    try:
        has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in img.info
        if has_alpha and background is not None:
            canvas = Image.new("RGBA", img.size, (*background, 255))
            canvas.alpha_composite(img.convert("RGBA"))
            return canvas.convert("RGB")
        return img if img.mode == "RGB" else img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise InputError(f"cannot convert an image of mode {img.mode} to RGB ({exc})") from None


def _tensor_as_hwc(t: torch.Tensor) -> np.ndarray:
    """A tensor image as an HxW or HxWxC numpy array (channel-last wins when both layouts would fit)."""
    t = t.detach().to("cpu")
    if t.dim() == 4:
        if t.shape[0] != 1:
            raise InputError(f"tensor of shape {list(t.shape)} is a batch of {t.shape[0]} images: pass one image")
        t = t[0]
    if t.dim() == 3 and t.shape[-1] not in (1, 3, 4):
        if t.shape[0] not in (1, 3, 4):
            raise InputError(f"tensor of shape {list(t.shape)} is not an image: expected [H,W,C] or [C,H,W] "
                             "with C in 1, 3 or 4")
        t = t.permute(1, 2, 0)  # [C,H,W] -> [H,W,C]
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()  # numpy has no bfloat16
    return t.numpy()


def _from_array(arr: np.ndarray, what: str) -> Image.Image:
    """An 8-bit PIL image from an HxW / HxWxC array; floats are read as 0..1, uint16 as 0..65535."""
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise InputError(f"{what} of shape {list(arr.shape)} is not an image: expected HxW or HxWxC with C in "
                         "1, 3 or 4")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InputError(f"{what} of shape {list(arr.shape)} is empty")
    if arr.dtype == np.bool_:
        u8 = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint8:
        u8 = arr
    elif arr.dtype == np.uint16:
        u8 = np.round(arr / 257.0).astype(np.uint8)  # 65535 -> 255 exactly; not a clip, not a shift
    elif np.issubdtype(arr.dtype, np.integer):
        if arr.min() < 0 or arr.max() > 255:
            raise InputError(f"{what} of dtype {arr.dtype} spans {arr.min()}..{arr.max()}: integer images other "
                             "than uint16 must be in 0..255")
        u8 = arr.astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        u8 = _float_to_u8(arr.astype(np.float32), what)
    else:
        raise InputError(f"{what} of dtype {arr.dtype} is not an image")
    return Image.fromarray(np.ascontiguousarray(u8))


def _float_to_u8(arr: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise InputError(f"{what} holds NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    # Small overshoots (bicubic/Lanczos ringing) are clipped; a range that is clearly another convention is not.
    if lo < -0.5 or hi > 1.5:
        raise InputError(f"{what} values span {lo:.3g}..{hi:.3g} but float images must be in 0..1 "
                         "(divide 0..255 data by 255; map -1..1 data with (x + 1) / 2)")
    return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- sizes

def prepare_reference(image: ImageLike, resize: bool = True, max_side: int = MAX_SIDE) -> Image.Image:
    """A reference image ready for the VAE: RGB, both sides multiples of 16.

    resize=True: Lanczos-resized from the original straight to `preferred_size` (any input size works).
    resize=False: kept at its own scale, center-cropped to multiples of 16; it must be 16..max_side per side,
    because every 16x16 block becomes a token and an unresized photo can exceed any GPU's memory.
    """
    img = load_image(image)
    w, h = img.size
    if resize:
        size = preferred_size(w, h)
        return img if img.size == size else img.resize(size, Image.Resampling.LANCZOS)
    if w < MULTIPLE or h < MULTIPLE:
        raise InputError(f"reference image is {w}x{h}; without resizing the minimum is {MULTIPLE}x{MULTIPLE} "
                         "(use resize=True to upscale it)")
    cw, ch = w // MULTIPLE * MULTIPLE, h // MULTIPLE * MULTIPLE
    if max(cw, ch) > max_side:
        raise InputError(f"reference image is {w}x{h}; without resizing each side must be at most {max_side} "
                         "(use resize=True, or downscale it)")
    if (cw, ch) != (w, h):
        left, top = (w - cw) // 2, (h - ch) // 2
        img = img.crop((left, top, left + cw, top + ch))
    return img


def output_size(width: int | None, height: int | None,
                first_ref_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """The (w, h) to generate.

    Neither given: the first reference's (prepared) size, or 1024x1024 without references. One given: the other
    follows the reference's aspect ratio (square without one). Every side is then floored to a multiple of 16, as
    diffusers and BFL do, and must lie in MIN_SIDE..MAX_SIDE.
    """
    width = None if width is None else integer(width, "width", 1, 1 << 30)
    height = None if height is None else integer(height, "height", 1, 1 << 30)
    ref_w, ref_h = first_ref_size if first_ref_size is not None else DEFAULT_SIZE
    if width is None and height is None:
        width, height = ref_w, ref_h
    elif height is None:
        height = round(width * ref_h / ref_w)
    elif width is None:
        width = round(height * ref_w / ref_h)
    return side(width, "output width"), side(height, "output height")


def to_tensor(img: ImageLike) -> torch.Tensor:
    """An image as [1, 3, H, W] float32 in [-1, 1] (x/255 * 2 - 1, the same float32 ops as diffusers)."""
    if not (isinstance(img, Image.Image) and img.mode == "RGB"):
        img = load_image(img)
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).to(torch.float32) / 255.0  # [H, W, 3]
    x = 2.0 * x - 1.0
    return x.permute(2, 0, 1).unsqueeze(0).contiguous()  # [1, 3, H, W]


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] pixels in [-1, 1] as B RGB images.

    Rounds like diffusers' postprocess: clamp(x * 0.5 + 0.5, 0, 1) * 255, round half to even. The input is upcast
    to float32 first (diffusers denormalises in the input's dtype, which for bf16 decodes costs precision), so
    float32 decodes give the same bytes as diffusers. NaNs (an overflowed fp16 decode) become black, with a warning.
    """
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[1] != 3:
        shape = list(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise InputError(f"expected pixels of shape [B, 3, H, W], got {shape}")
    x = pixels.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        logger.warning("decoded pixels hold NaN/inf values (numerical overflow?); they are written as black")
        x = torch.nan_to_num(x, nan=-1.0, posinf=1.0, neginf=-1.0)
    x = (x * 0.5 + 0.5).clamp(0, 1)
    u8 = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [B, H, W, 3]
    return [Image.fromarray(np.ascontiguousarray(a)) for a in u8]
