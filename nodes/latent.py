"""VAE nodes: LATENT <-> IMAGE with the Flux VAE (ours, or ComfyUI's own VAE object)."""
from __future__ import annotations

import torch

from kontext.errors import InputError

from .conditioning import VAE_TYPES
from .convert import crop_to_multiple, image_items, vae_decode, vae_encode


class KontextVAEDecode:
    DESCRIPTION = "Decodes a Flux LATENT (from Kontext Sampler or ComfyUI's samplers) into an IMAGE."
    CATEGORY = "Kontext/latent"
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image(s), 0..1 RGB.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "The latent to decode, e.g. Kontext Sampler's output."}),
            "vae": (VAE_TYPES, {"tooltip": "From Load Kontext VAE, or ComfyUI's Load VAE with ae.safetensors."}),
        }}

    def decode(self, samples, vae):
        latent = samples.get("samples") if isinstance(samples, dict) else None
        if latent is None:
            raise InputError("samples: expected a LATENT ({'samples': tensor})")
        return (vae_decode(vae, latent),)


class KontextVAEEncode:
    DESCRIPTION = ("Encodes an IMAGE into a Flux LATENT, center-cropped to multiples of 16 pixels so it can start "
                   "Kontext Sampler (denoise below 1). To use an image as a reference, use Kontext Reference Image.")
    CATEGORY = "Kontext/latent"
    FUNCTION = "encode"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The raw Flux latent, interchangeable with ComfyUI's VAE Encode output.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pixels": ("IMAGE", {"tooltip": "The image(s) to encode."}),
            "vae": (VAE_TYPES, {"tooltip": "From Load Kontext VAE, or ComfyUI's Load VAE with ae.safetensors."}),
        }}

    def encode(self, pixels, vae):
        items = image_items(pixels, "pixels")
        batch = crop_to_multiple(torch.stack(items), 16)
        return ({"samples": vae_encode(vae, batch)},)
