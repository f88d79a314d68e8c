"""`make-tiny`: random tiny models written in exactly the key layouts of the real release files.

Tests and the `--tiny` smoke run use them in place of the 24 GB originals. The writers live in the submodules `dit`,
`vae`, `text` (CLIP-L and T5-XXL) and `tokenizers`, all writing through `io`; they import the model modules, never
the reverse. The file names come from kontext.release (re-exported here under their old names); this module imports
the writers on use, so that `import kontext.tiny` stays cheap.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ..release import (FOLDERS, TINY_CLIP_L, TINY_DIT, TINY_DIT_DIFFUSERS, TINY_DIT_FP8, TINY_T5XXL, TINY_VAE,
                       TOKENIZERS_FOLDER)

if TYPE_CHECKING:
    from .dit import COMFY_PREFIX, diffusers_state, fp8_representable, tiny_dit_state, write_tiny_dit

log = logging.getLogger(__name__)

# The names under which this package has always offered them.
DIT_NAME, DIT_FP8_NAME, DIT_DIFFUSERS_NAME = TINY_DIT, TINY_DIT_FP8, TINY_DIT_DIFFUSERS
VAE_NAME, CLIP_NAME, T5_NAME = TINY_VAE, TINY_CLIP_L, TINY_T5XXL

_EXPORTS = {"write_tiny_dit": "dit", "diffusers_state": "dit", "fp8_representable": "dit", "tiny_dit_state": "dit",
            "COMFY_PREFIX": "dit"}
__all__ = ["make_tiny", "DIT_NAME", "DIT_FP8_NAME", "DIT_DIFFUSERS_NAME", "VAE_NAME", "CLIP_NAME", "T5_NAME",
           "write_tiny_dit", "diffusers_state", "fp8_representable", "tiny_dit_state", "COMFY_PREFIX"]


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
    paths["vae"] = write_tiny_vae(models / FOLDERS["vae"][0] / VAE_NAME, seed)
    paths["clip_l"] = write_tiny_clip_l(models / FOLDERS["clip_l"][0] / CLIP_NAME, seed)
    paths["t5xxl"] = write_tiny_t5xxl(models / FOLDERS["t5xxl"][0] / T5_NAME, seed)
    paths["tokenizers"] = write_tiny_tokenizers(models / TOKENIZERS_FOLDER)
    for p in models.rglob("*"):  # safetensors writes 0600; a ComfyUI server may run as another user
        p.chmod(0o755 if p.is_dir() else 0o644)
    log.info("wrote tiny models to %s", models)
    return paths
