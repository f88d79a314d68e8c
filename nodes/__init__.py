"""The Kontext node pack's ComfyUI node classes (classic API: INPUT_TYPES / RETURN_TYPES / FUNCTION).

Imported by the pack's root __init__.py inside ComfyUI, and directly by the tests. The engine package `kontext` lives
beside this folder; inside ComfyUI it is not installed, so its folder is put on sys.path (at the end: an installed
copy, e.g. `pip install -e .`, wins).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if importlib.util.find_spec("kontext") is None and _ROOT not in sys.path:
    sys.path.append(_ROOT)

from .conditioning import KontextReferenceImage, KontextTextEncode  # noqa: E402
from .image import KontextImageScale  # noqa: E402
from .latent import KontextVAEDecode, KontextVAEEncode  # noqa: E402
from .loaders import KontextModelLoader, KontextTextEncoderLoader, KontextVAELoader  # noqa: E402
from .lora import KontextLoraLoader  # noqa: E402
from .sampler import KontextSampler  # noqa: E402

NODE_CLASS_MAPPINGS = {
    "KontextModelLoader": KontextModelLoader,
    "KontextLoraLoader": KontextLoraLoader,
    "KontextTextEncoderLoader": KontextTextEncoderLoader,
    "KontextVAELoader": KontextVAELoader,
    "KontextTextEncode": KontextTextEncode,
    "KontextReferenceImage": KontextReferenceImage,
    "KontextSampler": KontextSampler,
    "KontextVAEDecode": KontextVAEDecode,
    "KontextVAEEncode": KontextVAEEncode,
    "KontextImageScale": KontextImageScale,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KontextModelLoader": "Load Kontext Model",
    "KontextLoraLoader": "Kontext LoRA",
    "KontextTextEncoderLoader": "Load Kontext Text Encoders",
    "KontextVAELoader": "Load Kontext VAE",
    "KontextTextEncode": "Kontext Text Encode",
    "KontextReferenceImage": "Kontext Reference Image",
    "KontextSampler": "Kontext Sampler",
    "KontextVAEDecode": "Kontext VAE Decode",
    "KontextVAEEncode": "Kontext VAE Encode",
    "KontextImageScale": "Kontext Image Scale (Preferred Resolution)",
}
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
