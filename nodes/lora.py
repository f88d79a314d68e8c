"""Kontext LoRA: a LoRA file of any common Flux/Kontext layout on the pack's MODEL, at every precision; chainable.

Inside ComfyUI the LoRA becomes ComfyUI's own patches on a clone of the MODEL (so ComfyUI's numbers, its memory
manager, unloading and strength changes all apply, and the base model another workflow shares is untouched); the
engine's reader turns every layout (ComfyUI/BFL, kohya, diffusers/PEFT with split q/k/v, xlabs, ...) into patches on
our BFL-named weights first. On fp8/fp4 weights the patches are applied to the dequantised weight at run time (see
model.py), never re-quantised. Outside ComfyUI the engine's `with_loras` does the same on a copy of the DiT.
"""
from __future__ import annotations

import logging

from .host import comfy, model_list, model_path
from .model import StandaloneModel, kontext_dit

log = logging.getLogger(__name__)


def comfy_patches(lora_file) -> dict:
    """The file's patches as ComfyUI's `add_patches` takes them: {key or (key, (0, start, size)): adapter}."""
    from comfy.weight_adapter.lora import LoRAAdapter

    out = {}
    for p in lora_file.patches:
        key = f"diffusion_model.{p.target}"
        if p.rows is not None:
            key = (key, (0, p.rows[0], p.rows[1] - p.rows[0]))
        if p.kind == "diff":
            out[key] = ("diff", (p.diff,))
        else:
            alpha = p.alpha if p.alpha is not None else float(p.down.shape[0])  # ComfyUI: no alpha = scale 1
            out[key] = LoRAAdapter(set(p.source_keys), (p.up, p.down, alpha, None, p.dora_scale, None))
    return out


class KontextLoraLoader:
    DESCRIPTION = ("Applies a LoRA to the Kontext MODEL: files in ComfyUI/BFL, kohya, diffusers/PEFT, xlabs and fal "
                   "layouts from models/loras, on bf16, fp8 and fp4 weights alike (quantised weights are never "
                   "re-quantised). Chain several for several LoRAs. ComfyUI's own LoraLoaderModelOnly also works on "
                   "this MODEL for the layouts it knows.")
    CATEGORY = "Kontext/loaders"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The MODEL with this LoRA added (the input MODEL is unchanged).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "From Load Kontext Model or another Kontext LoRA."}),
            "lora_name": (model_list("loras"), {"tooltip": "A Kontext (or Flux.1 dev) LoRA in models/loras."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "How strongly the LoRA applies (1: as trained; 0: off; negative "
                                              "values invert it)."}),
        }}

    def apply(self, model, lora_name: str, strength: float = 1.0):
        from kontext.lora.apply import check_loras, with_loras
        from kontext.lora.formats import read_lora

        dit = kontext_dit(model)
        dit.capabilities.require("lora")
        path = model_path("loras", lora_name, "LoRA")
        check_loras([(path, strength)])
        lora = read_lora(path, dit.config)
        if lora.unmatched:
            log.warning("Kontext LoRA %s: %d keys match no layer and are ignored (e.g. %s)", path.name,
                        len(lora.unmatched), ", ".join(lora.unmatched[:3]))
        if strength == 0:
            return (model,)
        if comfy("comfy.model_patcher") is None or isinstance(model, StandaloneModel):
            return (StandaloneModel(with_loras(dit, [(lora, strength)]), model.load_device),)
        patched = model.clone()
        added = patched.add_patches(comfy_patches(lora), strength)
        log.info("Kontext LoRA %s (%s layout): %d patches on %d weights, strength %g", path.name, lora.format,
                 len(lora.patches), len({k if isinstance(k, str) else k[0] for k in added}), strength)
        return (patched,)
