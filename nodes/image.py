"""Kontext Image Scale: resize an image to the nearest of Kontext's preferred resolutions."""
from __future__ import annotations

from PIL import Image

from kontext.errors import InputError

from .convert import image_items, pil_to_image

FITS = ("stretch", "crop")


def scale_to_preferred(img: Image.Image, fit: str) -> Image.Image:
    """Resize (Lanczos) to preferred_size; "crop" first center-crops to that size's aspect ratio."""
    from kontext.references import preferred_size

    w, h = img.size
    tw, th = preferred_size(w, h)
    if fit == "crop":
        # Largest centered box of the target's aspect ratio: no stretching, at most a thin edge lost.
        if w * th > h * tw:
            cw, ch = round(h * tw / th), h
        else:
            cw, ch = w, round(w * th / tw)
        left, top = (w - cw) // 2, (h - ch) // 2
        img = img.crop((left, top, left + cw, top + ch))
    return img if img.size == (tw, th) else img.resize((tw, th), Image.Resampling.LANCZOS)


class KontextImageScale:
    DESCRIPTION = ("Resizes an image to the nearest of the 17 resolutions FLUX.1 Kontext was trained on (about one "
                   "megapixel, sides multiples of 16), e.g. to preview what Kontext Reference Image will encode or "
                   "to feed Kontext VAE Encode.")
    CATEGORY = "Kontext/image"
    FUNCTION = "scale"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The resized image(s).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The image(s) to resize."}),
            "fit": (list(FITS), {"default": "stretch",
                                 "tooltip": "stretch: resize straight to the preferred size (as BFL's and diffusers' "
                                            "pipelines do, and Kontext Reference Image). crop: center-crop to its "
                                            "aspect ratio first (as ComfyUI's FluxKontextImageScale)."}),
        }}

    def scale(self, image, fit: str = "stretch"):
        from kontext.references import load_image

        if fit not in FITS:
            raise InputError(f"fit {fit!r}: expected one of {', '.join(FITS)}")
        return (pil_to_image([scale_to_preferred(load_image(one), fit) for one in image_items(image, "image")]),)
