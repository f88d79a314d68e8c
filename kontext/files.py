"""Finding the release files in a ComfyUI-style `models/` folder (or make-tiny's copy of that layout)."""
from __future__ import annotations

import os
from pathlib import Path

from . import tiny
from .errors import InputError

# Folder names ComfyUI uses (newest first) and the file names to look for, best first.
CANDIDATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "dit": (("diffusion_models", "unet"),
            ("flux1-kontext-dev.safetensors", "flux1-dev-kontext_fp8_scaled.safetensors", tiny.DIT_NAME)),
    "vae": (("vae",), ("ae.safetensors", tiny.VAE_NAME)),
    "clip_l": (("text_encoders", "clip"), ("clip_l.safetensors", tiny.CLIP_NAME)),
    "t5xxl": (("text_encoders", "clip"),
              ("t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors", tiny.T5_NAME)),
}


def find_model_files(models: str | os.PathLike) -> dict[str, Path]:
    """Paths of the DiT, VAE, CLIP-L, T5-XXL (and a tokenizers/ folder if present; else the packaged tokenizers apply) inside `models`."""
    root = Path(models).expanduser()
    if not root.is_dir():
        raise InputError(f"models folder {root} does not exist")
    found: dict[str, Path] = {}
    for role, (folders, names) in CANDIDATES.items():
        hits = [root / f / n for n in names for f in folders if (root / f / n).exists()]
        if not hits:
            wanted = " or ".join(f"{folders[0]}/{n}" for n in names[:2])
            raise InputError(f"no {role} model in {root}: expected {wanted} (see `python -m kontext download`)")
        found[role] = hits[0]
    if (root / "tokenizers").is_dir():  # make-tiny's (its own small vocabularies), or `download`'s
        found["tokenizers"] = root / "tokenizers"
    return found
