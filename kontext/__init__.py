"""FLUX.1 Kontext [dev] in pure PyTorch: the engine behind the ComfyUI node pack, usable on its own.

Public names are imported lazily so that `import kontext` stays cheap (ComfyUI imports every pack at start-up).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "FluxConfig": "kontext.config",
    "FluxDiT": "kontext.dit",
    "load_dit": "kontext.flux_loader",
    "load_vae": "kontext.vae",
    "load_clip_l": "kontext.text.clip",
    "load_t5xxl": "kontext.text.t5",
    "load_tokenizers": "kontext.text.tokenizers",
    "KontextPipeline": "kontext.pipeline",
    "make_tiny": "kontext.tiny",
    "KontextError": "kontext.errors",
    "CheckpointError": "kontext.errors",
    "InputError": "kontext.errors",
    "Cancelled": "kontext.errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kontext' has no attribute {name!r}")
