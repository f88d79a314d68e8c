"""Conditioning nodes: the instruction (CLIP-L + T5-XXL) and the reference images (VAE latents appended to it)."""
from __future__ import annotations

import logging

import torch

from kontext.errors import InputError
from kontext.ids import METHODS

from .convert import add_references, image_items, pil_to_image, vae_encode
from .host import check_interrupt

log = logging.getLogger(__name__)

VAE_TYPES = "KONTEXT_VAE,VAE"  # ours or ComfyUI's (Load VAE): both map IMAGE <-> the same raw latent
RESIZE_MODES = ("preferred", "keep")


class KontextTextEncode:
    DESCRIPTION = ("Encodes the edit instruction (\"make the car red\", \"same character, now at the beach\") with "
                   "T5-XXL and CLIP-L into a CONDITIONING in ComfyUI's Flux layout, so it also works with ComfyUI's "
                   "FluxGuidance, ReferenceLatent and KSampler.")
    CATEGORY = "Kontext/conditioning"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The encoded instruction with its guidance; chain Kontext Reference Image nodes after it.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoders": ("KONTEXT_TEXT_ENCODERS", {"tooltip": "From Load Kontext Text Encoders."}),
            "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                  "tooltip": "What to do to the reference image(s), or the picture to draw. "
                                             "Name what must stay (\"keep the face and pose\")."}),
            "guidance": ("FLOAT", {"default": 2.5, "min": 0.0, "max": 100.0, "step": 0.1,
                                   "tooltip": "Embedded guidance strength (Kontext's default is 2.5; higher follows "
                                              "the prompt more literally). Kontext Sampler uses it unless its own "
                                              "guidance is above 0."}),
        }}

    def encode(self, text_encoders, prompt: str, guidance: float = 2.5):
        from kontext.pipeline import encode_prompt

        if not isinstance(prompt, str):
            raise InputError(f"prompt must be text, got {type(prompt).__name__}")
        check_interrupt()
        with text_encoders.running():
            txt, pooled = encode_prompt(text_encoders.clip, text_encoders.t5, text_encoders.tokenizers, prompt)
        cond = [[txt.float().cpu(), {"pooled_output": pooled.float().cpu(), "guidance": float(guidance)}]]
        return (cond,)


class KontextReferenceImage:
    DESCRIPTION = ("Adds a reference image to the conditioning: it is resized, encoded with the VAE and appended to "
                   "the conditioning's reference latents (the same place ComfyUI's ReferenceLatent uses). Chain "
                   "several for several references; each image of a batch becomes one reference.")
    CATEGORY = "Kontext/conditioning"
    FUNCTION = "add"
    RETURN_TYPES = ("CONDITIONING", "LATENT")
    RETURN_NAMES = ("conditioning", "latent")
    OUTPUT_TOOLTIPS = ("The conditioning with this reference appended.",
                       "The reference's latent (e.g. for Kontext Sampler's latent input with denoise below 1).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CONDITIONING", {"tooltip": "From Kontext Text Encode (or a previous reference node)."}),
            "vae": (VAE_TYPES, {"tooltip": "From Load Kontext VAE, or ComfyUI's Load VAE with ae.safetensors."}),
            "image": ("IMAGE", {"tooltip": "The image to edit, or a character/object/style to draw from."}),
            "resize": (list(RESIZE_MODES), {"default": "preferred",
                                            "tooltip": "preferred: resize to the nearest of Kontext's 17 training "
                                                       "resolutions (about 1 megapixel; recommended). keep: keep the "
                                                       "size, center-cropped to multiples of 16."}),
            "reference_method": (list(METHODS), {"default": "offset",
                                                           "tooltip": "How references are placed for the model. "
                                                                      "offset: side by side on one canvas (Kontext "
                                                                      "dev's training); index: one index per "
                                                                      "reference. Applies to all references."}),
        }}

    def add(self, conditioning, vae, image, resize: str = "preferred", reference_method: str = "offset"):
        from kontext.references import prepare_reference

        if resize not in RESIZE_MODES:
            raise InputError(f"resize {resize!r}: expected one of {', '.join(RESIZE_MODES)}")
        if reference_method not in METHODS:
            raise InputError(f"reference_method {reference_method!r}: expected one of {', '.join(METHODS)}")
        latents = []
        for one in image_items(image, "image"):
            check_interrupt()
            prepared = prepare_reference(one, resize=resize == "preferred")  # same rule as the CLI and library
            latents.append(vae_encode(vae, pil_to_image([prepared])))
        log.info("Kontext: reference %s", ", ".join(f"{l.shape[3] * 8}x{l.shape[2] * 8}" for l in latents))
        cond = add_references(conditioning, latents, reference_method, "conditioning")
        return (cond, {"samples": torch.cat(latents) if len({l.shape for l in latents}) == 1 else latents[0]})
