"""Conversions between ComfyUI's data types and the engine's: IMAGE, LATENT, CONDITIONING, and either kind of VAE.

IMAGE is [B, H, W, C] float 0..1 on the CPU; the engine's pixels are [B, 3, H, W] in [-1, 1]. LATENT is
{"samples": raw latent}. CONDITIONING is ComfyUI's [[tokens, {"pooled_output", "guidance", "reference_latents",
"reference_latents_method"}], ...]; entries are copied, never changed in place, because ComfyUI caches node outputs.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from kontext.errors import InputError
from kontext.vae_tiling import decode_or_tiled

from .host import check_interrupt
from .placement import Placed


# ---------------------------------------------------------------------------------------------- images

def image_items(image, what: str = "image") -> list[torch.Tensor]:
    """An IMAGE (or a list of them) as a list of single images [H, W, C]; a clear error for mixed sizes."""
    if isinstance(image, torch.Tensor):
        if image.dim() == 3:
            image = image.unsqueeze(0)
        if image.dim() != 4 or image.shape[-1] not in (1, 3, 4) or image.shape[0] < 1:
            raise InputError(f"{what}: expected an IMAGE [batch, height, width, channels], got {list(image.shape)}")
        return list(image)
    if isinstance(image, (list, tuple)) and image:
        items = [t for part in image for t in image_items(part, what)]
        sizes = sorted({f"{t.shape[1]}x{t.shape[0]}" for t in items})
        if len(sizes) > 1:
            raise InputError(f"{what}: the batch mixes image sizes ({', '.join(sizes)}); a batch must be one size. "
                             "Scale the images to one size first, or give each its own Kontext Reference Image node")
        return items
    raise InputError(f"{what}: expected an IMAGE, got {type(image).__name__}")


def pil_to_image(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> IMAGE [B, H, W, 3]."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays))


def pixels_to_image(pixels: torch.Tensor) -> torch.Tensor:
    """Engine pixels [B, 3, H, W] in ~[-1, 1] -> IMAGE [B, H, W, 3] in [0, 1] (float32, CPU)."""
    return ((pixels.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1).contiguous()


def crop_to_multiple(image: torch.Tensor, multiple: int = 16) -> torch.Tensor:
    """Center-crop an IMAGE so height and width are multiples of `multiple` (as ComfyUI's VAEEncode does for 8)."""
    h, w = image.shape[1], image.shape[2]
    ch, cw = h // multiple * multiple, w // multiple * multiple
    if ch < multiple or cw < multiple:
        raise InputError(f"image is {w}x{h}; it must be at least {multiple}x{multiple} pixels")
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[:, top:top + ch, left:left + cw, :]


# ---------------------------------------------------------------------------------------------- VAE (ours or ComfyUI's)

def is_ours(vae) -> bool:
    return isinstance(vae, Placed) and vae.kind == "vae"


def vae_encode(vae, image: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, C] (sides multiples of 8) -> raw latent [B, 16, H/8, W/8] on the CPU."""
    rgb = image[..., :3] if image.shape[-1] >= 3 else image[..., :1].expand(*image.shape[:-1], 3)  # grey -> RGB
    if not is_ours(vae):
        if not hasattr(vae, "encode") or not hasattr(vae, "decode"):
            raise InputError(f"vae input: expected a Kontext VAE or ComfyUI's VAE, got {type(vae).__name__}")
        return vae.encode(rgb).float().cpu()  # ComfyUI's VAE takes IMAGE and gives its raw latent, like ours
    latents = []
    with vae.running():
        for one in rgb:  # one image at a time bounds activation memory at 1024^2
            check_interrupt()
            pixels = one.movedim(-1, 0).unsqueeze(0).to(vae.vae.device, torch.float32) * 2.0 - 1.0
            latents.append(vae.vae.encode(pixels).float().cpu())
    return torch.cat(latents)


def vae_decode(vae, samples: torch.Tensor) -> torch.Tensor:
    """Raw latent [B, 16, h, w] -> IMAGE [B, 8h, 8w, 3]."""
    if samples.dim() != 4 or samples.shape[1] != 16:
        raise InputError(f"samples: expected a Flux LATENT [batch, 16, h, w], got {list(samples.shape)} "
                         "(a latent from another model family?)")
    if not is_ours(vae):
        if not hasattr(vae, "decode"):
            raise InputError(f"vae input: expected a Kontext VAE or ComfyUI's VAE, got {type(vae).__name__}")
        return vae.decode(samples)
    images = []
    with vae.running():
        for one in samples:
            check_interrupt()
            images.append(pixels_to_image(decode_or_tiled(vae.vae, one.unsqueeze(0).to(vae.vae.device))))
    return torch.cat(images)


# ---------------------------------------------------------------------------------------------- conditioning

def entries(cond, what: str) -> list[tuple[torch.Tensor, dict]]:
    """The checked (tokens, options) entries of a CONDITIONING."""
    if not isinstance(cond, (list, tuple)) or not cond:
        raise InputError(f"{what}: expected a CONDITIONING, got {type(cond).__name__}")
    out = []
    for entry in cond:
        if (not isinstance(entry, (list, tuple)) or len(entry) < 2 or not isinstance(entry[0], torch.Tensor)
                or not isinstance(entry[1], dict)):
            raise InputError(f"{what}: not a CONDITIONING entry ([tokens, options]): {type(entry).__name__}")
        out.append((entry[0], entry[1]))
    return out


def add_references(cond, latents: list[torch.Tensor], method: str, what: str) -> list:
    """A copy with `latents` appended to every entry's reference_latents (as ComfyUI's ReferenceLatent does)."""
    out = []
    for tokens, opts in entries(cond, what):
        opts = dict(opts)
        opts["reference_latents"] = [*opts.get("reference_latents", []), *latents]
        opts["reference_latents_method"] = method
        out.append([tokens, opts])
    return out
