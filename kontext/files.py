"""Finding the release files in a ComfyUI-style `models/` folder (or make-tiny's copy of that layout)."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError
from .release import CANDIDATES, FOLDERS, TOKENIZERS_FOLDER


def find_model_files(models: str | os.PathLike) -> dict[str, Path]:
    """Paths of the DiT, VAE, CLIP-L, T5-XXL (and a tokenizers/ folder if present; else the packaged tokenizers apply) inside `models`."""
    root = Path(models).expanduser()
    if not root.is_dir():
        raise InputError(f"models folder {root} does not exist")
    found: dict[str, Path] = {}
    for role, names in CANDIDATES.items():
        folders = FOLDERS[role]
        hits = [root / f / n for n in names for f in folders if (root / f / n).exists()]
        if not hits:
            wanted = " or ".join(f"{folders[0]}/{n}" for n in names[:2])
            raise InputError(f"no {role} model in {root}: expected {wanted} (see `python -m kontext download`)")
        found[role] = hits[0]
    if (root / TOKENIZERS_FOLDER).is_dir():  # make-tiny's (its own small vocabularies), or `download`'s
        found["tokenizers"] = root / TOKENIZERS_FOLDER
    return found
