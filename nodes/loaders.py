"""Loader nodes: the Kontext DiT, the two text encoders (CLIP-L + T5-XXL) and the Flux VAE, from ComfyUI's folders."""
from __future__ import annotations

import logging

import torch

from kontext.errors import InputError

from .cache import cached
from .host import engine_dirs, engine_list, engine_path, fingerprint, model_list, model_path
from .placement import POLICIES, Placed, compute_dtype, model_for

log = logging.getLogger(__name__)

DEVICE_TOOLTIP = ("auto: ComfyUI's memory manager moves it to the GPU to run and back to RAM when others need the "
                  "room; offload: on the GPU only while it runs (least VRAM); cpu: load and run on the CPU (slow)")


def _precisions() -> list[str]:
    from kontext.precision import PRECISIONS

    return ["auto", *PRECISIONS]


def _default(files: list[str], stem: str) -> dict:
    """A widget default: the first file whose name starts with `stem` (a fresh node then shows the right pair)."""
    match = next((f for f in files if f.rsplit("/", 1)[-1].lower().startswith(stem)), None)
    return {"default": match} if match else {}


def _changed(folder: str, name: str) -> str:
    """IS_CHANGED value: the file's size and mtime, so ComfyUI re-runs a loader whose file was rewritten."""
    try:
        return fingerprint(model_path(folder, name, "model"))
    except Exception:  # a missing file: let the loader itself raise the clear error
        return f"missing:{name}"


class KontextModelLoader:
    DESCRIPTION = ("Loads the FLUX.1 Kontext [dev] diffusion transformer from models/diffusion_models: BFL's "
                   "flux1-kontext-dev.safetensors, ComfyUI's flux1-dev-kontext_fp8_scaled.safetensors or a diffusers "
                   "transformer folder (the layout is detected), as ComfyUI's own MODEL: use it with Kontext Sampler, "
                   "or with KSampler, LoRA loaders and ComfyUI's model patches. Loaded once and reused while the file "
                   "is unchanged.")
    CATEGORY = "Kontext/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The Kontext diffusion transformer as a ComfyUI MODEL (ComfyUI's Flux model class with the "
                       "pack's DiT inside), for Kontext Sampler or KSampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dit_name": (model_list("diffusion_models", folders_too=True),
                         {"tooltip": "Diffusion model file in models/diffusion_models: bf16, fp8_scaled or "
                                     "mixed fp8/NVFP4 files (quantised weights stay quantised in memory)."}),
            "weight_dtype": (_precisions(), {"default": "auto",
                                             "tooltip": "auto: the file's own format, computing in bf16 on GPUs "
                                                        "(fp16 where bf16 is unsupported), fp32 on the CPU. bf16/fp16/"
                                                        "fp32: dense weights in that dtype. fp8/fp4: quantise a "
                                                        "full-precision file on load (fp8 about half, fp4 about a "
                                                        "quarter of the memory); fp8 matmuls on RTX 40xx/H100 and "
                                                        "newer, elsewhere dequantised per layer."}),
            "device": (list(POLICIES), {"default": "auto", "tooltip": DEVICE_TOOLTIP}),
        }, "optional": {
            "engine": (["none", "auto", *engine_list()], {
                "default": "none",
                "tooltip": "none: run the DiT in PyTorch. auto: the TensorRT engine in models/tensorrt built from "
                           "this diffusion model for this GPU (python -m kontext export-onnx, then build-engine; "
                           "needs the tensorrt package). Or pick an engine file. An engine takes no LoRA or model "
                           "patches and runs only the sizes it was built for."}),
        }}

    @classmethod
    def IS_CHANGED(cls, dit_name, weight_dtype="auto", device="auto", engine="none"):
        changed = _changed("diffusion_models", dit_name)
        if engine not in ("none", "auto"):
            try:
                changed += "||" + fingerprint(engine_path(engine))
            except Exception:
                changed += f"||missing:{engine}"
        return changed

    def load(self, dit_name: str, weight_dtype: str = "auto", device: str = "auto", engine: str = "none"):
        from kontext.flux_loader import load_dit
        from kontext.precision import resolve

        path = model_path("diffusion_models", dit_name, "diffusion model")
        if engine != "none":
            return (self._engine(path, weight_dtype, device, engine),)
        # auto: the file's own format (an fp8 file stays fp8), computing in ComfyUI's dtype for the device.
        prec = resolve(weight_dtype, compute_dtype(device, "dit"), torch.device("cpu"), name="weight_dtype")

        def load():
            dit = load_dit(path, device="cpu", dtype=prec.compute, precision=weight_dtype)
            return model_for(dit, device)

        return (cached("dit", (path,), (weight_dtype, str(prec.compute), device), load),)

    @staticmethod
    def _engine(path, weight_dtype: str, device: str, engine: str):
        from kontext.errors import KontextError
        from kontext.flux_loader import load_dit

        if device == "cpu":
            raise InputError("a TensorRT engine runs on an NVIDIA GPU: set device to auto or offload, or engine to "
                             "none")
        places = engine_dirs() if engine == "auto" else [engine_path(engine)]

        def load():
            reasons = []
            for place in places:
                try:
                    dit = load_dit(path, precision=weight_dtype, backend="tensorrt", engine=place)
                except KontextError as exc:  # another folder may hold the right engine
                    reasons.append(str(exc))
                    continue
                return model_for(dit, device)
            raise InputError(" | ".join(reasons) or "no engine folder (models/tensorrt) exists yet")

        existing = tuple(p for p in places if p.exists())
        return cached("dit", (path, *existing), ("tensorrt", engine, weight_dtype, device), load)


class KontextTextEncoderLoader:
    DESCRIPTION = ("Loads the two text encoders of Flux from models/text_encoders: CLIP-L (clip_l.safetensors) for "
                   "the pooled vector and T5-XXL (t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn_scaled.safetensors) for "
                   "the token sequence, plus their tokenizers (ComfyUI's own copies, or $KONTEXT_TOKENIZERS).")
    CATEGORY = "Kontext/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("KONTEXT_TEXT_ENCODERS",)
    RETURN_NAMES = ("text_encoders",)
    OUTPUT_TOOLTIPS = ("CLIP-L + T5-XXL with tokenizers, for Kontext Text Encode.",)

    @classmethod
    def INPUT_TYPES(cls):
        files = model_list("text_encoders")
        return {"required": {
            "clip_name": (files, {**_default(files, "clip_l"),
                                  "tooltip": "The CLIP-L text encoder, usually clip_l.safetensors."}),
            "t5_name": (files, {**_default(files, "t5xxl"),
                                "tooltip": "The T5-XXL encoder, usually t5xxl_fp16.safetensors "
                                           "(or t5xxl_fp8_e4m3fn_scaled.safetensors for less memory)."}),
            "device": (list(POLICIES), {"default": "auto", "tooltip": DEVICE_TOOLTIP}),
        }}

    @classmethod
    def IS_CHANGED(cls, clip_name, t5_name, device="auto"):
        return _changed("text_encoders", clip_name) + "||" + _changed("text_encoders", t5_name)

    def load(self, clip_name: str, t5_name: str, device: str = "auto"):
        from kontext.text.clip import load_clip_l
        from kontext.text.t5 import load_t5xxl
        from kontext.text.tokenizers import load_tokenizers

        clip_path = model_path("text_encoders", clip_name, "CLIP-L text encoder")
        t5_path = model_path("text_encoders", t5_name, "T5-XXL text encoder")
        dtype = compute_dtype(device, "text")

        def load():
            tokenizers = load_tokenizers()
            placed = Placed(device, "text", f"{clip_path.name} + {t5_path.name}",
                            clip=load_clip_l(clip_path, device="cpu", dtype=dtype),
                            t5=load_t5xxl(t5_path, device="cpu", dtype=dtype))
            placed.tokenizers = tokenizers
            return placed

        return (cached("text_encoders", (clip_path, t5_path), (str(dtype), device), load),)


class KontextVAELoader:
    DESCRIPTION = ("Loads the Flux VAE (ae.safetensors) from models/vae, for Kontext Reference Image, Kontext VAE "
                   "Encode and Kontext VAE Decode. Those nodes also accept ComfyUI's own VAE (Load VAE).")
    CATEGORY = "Kontext/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("KONTEXT_VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The Flux autoencoder (16 latent channels).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (model_list("vae"), {"tooltip": "The Flux VAE file, usually ae.safetensors."}),
            "device": (list(POLICIES), {"default": "auto", "tooltip": DEVICE_TOOLTIP}),
        }}

    @classmethod
    def IS_CHANGED(cls, vae_name, device="auto"):
        return _changed("vae", vae_name)

    def load(self, vae_name: str, device: str = "auto"):
        from kontext.vae import load_vae

        path = model_path("vae", vae_name, "VAE")
        dtype = compute_dtype(device, "vae")

        def load():
            return Placed(device, "vae", path.name, vae=load_vae(path, device="cpu", dtype=dtype))

        return (cached("vae", (path,), (str(dtype), device), load),)
