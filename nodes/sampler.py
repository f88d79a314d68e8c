"""Kontext Sampler: the engine's rectified-flow loop driven by ComfyUI conditioning, with progress and previews."""
from __future__ import annotations

import logging
import traceback

import torch

from kontext.errors import InputError
from kontext.ids import METHODS
from kontext.params import NODE, SamplingParams

from .convert import entries
from .host import Progress, check_interrupt
from .model import kontext_dit
from .placement import loaded

log = logging.getLogger(__name__)

DEFAULT_GUIDANCE = 2.5
# Conditioning options of ComfyUI's area/mask/strength/timestep-range nodes, with the value that means "unset".
UNSUPPORTED = {"area": None, "mask": None, "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}


def _cond(cond, what: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(tokens [1, L, D], pooled [1, 768], options) of a CONDITIONING's first entry."""
    items = entries(cond, what)
    if len(items) > 1:  # ComfyUI would run and blend one prediction per entry; silently using one would mislead
        raise InputError(f"{what} holds {len(items)} conditionings (ConditioningCombine?): Kontext Sampler takes one; "
                         "use ConditioningConcat or a single Kontext Text Encode instead")
    tokens, opts = items[0]
    unsupported = [k for k, default in UNSUPPORTED.items() if k in opts and opts[k] != default]
    if unsupported:
        raise InputError(f"{what} sets {', '.join(unsupported)} (area, mask, strength or timestep-range "
                         "conditioning), which Kontext Sampler does not support; remove that node")
    pooled = opts.get("pooled_output")
    if pooled is None:
        raise InputError(f"{what} has no pooled CLIP vector: encode it with Kontext Text Encode, or with ComfyUI's "
                         "CLIPTextEncode and a Flux CLIP (DualCLIPLoader type flux)")
    return tokens, pooled, opts


class KontextSampler:
    DESCRIPTION = ("Generates the edited image's latent with FLUX.1 Kontext [dev]: the instruction and reference "
                   "images come in the positive conditioning, the size follows the first reference unless set. "
                   "Shows progress and live previews; Cancel stops it between steps.")
    CATEGORY = "Kontext/sampling"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The generated latent; decode it with Kontext VAE Decode (or ComfyUI's VAE Decode).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "From Load Kontext Model (with any LoRA loaders after it)."}),
                "positive": ("CONDITIONING", {"tooltip": "The instruction with its reference images (Kontext Text "
                                                         "Encode, then Kontext Reference Image nodes)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Seed of the starting noise; the same seed gives the same image on "
                                            "any device."}),
                "steps": ("INT", {"default": 28, "min": 1, "max": 200,
                                  "tooltip": "Denoising steps (28 is Kontext's default; 20 is usually enough)."}),
                "guidance": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                       "tooltip": "Embedded guidance. 0: take it from the conditioning (Kontext Text "
                                                  "Encode or FluxGuidance; 2.5 if unset). Above 0: use this value."}),
                "true_cfg": ("FLOAT", {"default": 1.0, "min": 1.0, "max": 20.0, "step": 0.1,
                                       "tooltip": "True classifier-free guidance against the negative input. 1 "
                                                  "disables it (one model pass per step; above 1 costs two)."}),
                "width": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 16,
                                  "tooltip": "Output width in pixels (multiple of 16). 0: from the latent input, "
                                             "else the first reference, else 1024."}),
                "height": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 16,
                                   "tooltip": "Output height in pixels (multiple of 16). 0: from the latent input, "
                                              "else the first reference, else 1024."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                      "tooltip": "1: start from pure noise. Below 1: start from the latent input, "
                                                 "noised to this level (runs that share of the steps)."}),
            },
            "optional": {
                "negative": ("CONDITIONING", {"tooltip": "What to steer away from; used only when true_cfg > 1."}),
                "latent": ("LATENT", {"tooltip": "Starting latent for denoise < 1 (e.g. Kontext VAE Encode of an "
                                                 "image); also sets the size and batch when width/height are 0."}),
            },
        }

    def sample(self, model, positive, seed: int, steps: int, guidance: float, true_cfg: float, width: int,
               height: int, denoise: float, negative=None, latent=None):
        from kontext.pipeline import sample_latent
        from kontext.run_size import activation_bytes, check_latent, run_size, token_count

        txt, pooled, opts = _cond(positive, "positive")
        if guidance <= 0:
            guidance = opts.get("guidance")
            guidance = DEFAULT_GUIDANCE if guidance is None else float(guidance)
        refs = list(opts.get("reference_latents") or [])
        method = opts.get("reference_latents_method", "offset")
        if method not in METHODS:
            raise InputError(f"reference method {method!r} (from the conditioning) is not supported by Kontext "
                             f"Sampler (supported: {', '.join(METHODS)})")
        # Every number is checked before any work, in the node's own input names.
        SamplingParams(steps=steps, guidance=guidance, true_cfg=true_cfg, denoise=denoise, seed=seed,
                       reference_method=method).validated(NODE)
        neg_txt = neg_pooled = None
        if true_cfg > 1.0:
            if negative is None:
                raise InputError("true_cfg above 1 needs the negative input: connect a Kontext Text Encode "
                                 "(e.g. an empty prompt or \"blurry, distorted\")")
            neg_txt, neg_pooled, _ = _cond(negative, "negative")
        elif negative is not None:
            log.info("Kontext Sampler: negative conditioning ignored because true_cfg is 1")

        init = None
        if latent is not None:
            init = check_latent(latent.get("samples") if isinstance(latent, dict) else None)
            if "noise_mask" in latent:
                log.warning("Kontext Sampler: the latent's noise mask is ignored (no inpainting)")
        size = run_size(width, height, init, refs, denoise)
        w, h, batch = size.width, size.height, size.batch

        dit = kontext_dit(model)
        extra = activation_bytes(token_count(size, refs, txt.shape[1]), dit.config.hidden_size, batch,
                                 2 if neg_txt is not None else 1, dit.compute_dtype)
        log.info("Kontext Sampler: %dx%d, %d reference(s), %d steps, guidance %.2f, true_cfg %.2f, seed %d",
                 w, h, len(refs), steps, guidance, true_cfg, seed)
        check_interrupt()
        with loaded(model, extra) as device:
            progress = Progress(steps, device)
            try:
                out = sample_latent(dit, txt, pooled, ref_latents=refs, width=w, height=h, seed=seed,
                                    steps=steps, guidance=guidance, true_cfg=true_cfg, neg_txt=neg_txt,
                                    neg_pooled=neg_pooled, denoise=denoise,
                                    init_latent=init if denoise < 1.0 else None, reference_method=method,
                                    callback=progress, num_images=batch, device=device)
            except BaseException as exc:  # a cancel: let the run's tensors go now, not with ComfyUI's error report
                traceback.clear_frames(exc.__traceback__)
                raise
        return ({"samples": out.float().cpu()},)
