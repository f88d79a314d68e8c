"""`make-tiny`: random tiny models written in exactly the key layouts of the real release files.

Tests and the `--tiny` smoke run use them in place of the 24 GB originals. The writers live in the submodules `dit`,
`vae`, `text` (CLIP-L and T5-XXL) and `tokenizers`, all writing through `io`; they import the model modules, never
the reverse. This module names the files and imports the writers on use, so that reading a name (kontext.files) is
cheap.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .dit import diffusers_state, fp8_representable, tiny_dit_state, write_tiny_dit

log = logging.getLogger(__name__)

DIT_NAME = "kontext-tiny.safetensors"
DIT_FP8_NAME = "kontext-tiny-fp8_scaled.safetensors"
DIT_DIFFUSERS_NAME = "kontext-tiny-diffusers"
VAE_NAME = "ae-tiny.safetensors"
CLIP_NAME = "clip_l-tiny.safetensors"
T5_NAME = "t5xxl-tiny.safetensors"
COMFY_PREFIX = "model.diffusion_model."

_EXPORTS = {"write_tiny_dit": "dit", "diffusers_state": "dit", "fp8_representable": "dit", "tiny_dit_state": "dit"}
__all__ = ["make_tiny", "DIT_NAME", "DIT_FP8_NAME", "DIT_DIFFUSERS_NAME", "VAE_NAME", "CLIP_NAME", "T5_NAME",
           "COMFY_PREFIX", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_tiny(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write every tiny model into `out_dir` laid out like ComfyUI's `models/` folder; returns the paths by role."""
    from .dit import write_tiny_dit
    from .text import write_tiny_clip_l, write_tiny_t5xxl
    from .tokenizers import write_tiny_tokenizers
    from .vae import write_tiny_vae

    models = Path(out_dir)
    models.mkdir(parents=True, exist_ok=True)
    paths = write_tiny_dit(models, seed)
    paths["vae"] = write_tiny_vae(models / "vae" / VAE_NAME, seed)
    paths["clip_l"] = write_tiny_clip_l(models / "text_encoders" / CLIP_NAME, seed)
    paths["t5xxl"] = write_tiny_t5xxl(models / "text_encoders" / T5_NAME, seed)
    paths["tokenizers"] = write_tiny_tokenizers(models / "tokenizers")
    for p in models.rglob("*"):  # safetensors writes 0600; a ComfyUI server may run as another user
        p.chmod(0o755 if p.is_dir() else 0o644)
    log.info("wrote tiny models to %s", models)
    return paths
