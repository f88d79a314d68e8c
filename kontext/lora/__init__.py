"""LoRAs for the DiT: `read_lora` reads any common FLUX.1 layout into patches on our parameters (formats), whose
numbers `apply_patches` computes as ComfyUI does (math); `with_loras` applies them to a model (apply).

Names are imported lazily, as in `kontext`, so that importing the package stays cheap.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "LoraPatch": "kontext.lora.formats",
    "LoraFile": "kontext.lora.formats",
    "read_lora": "kontext.lora.formats",
    "lora_delta": "kontext.lora.math",
    "apply_patches": "kontext.lora.math",
    "with_loras": "kontext.lora.apply",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kontext.lora' has no attribute {name!r}")
