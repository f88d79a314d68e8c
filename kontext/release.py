"""The one list of release file names: where each model lives in ComfyUI's `models/` folder, which Hugging Face
repository it comes from, and the tiny stand-ins `make-tiny` writes in the same layout.

kontext.files finds models by these names, kontext.hub downloads them, and kontext.tiny writes the tiny ones; none
of them spells a file name of its own. Plain data, no imports: reading a name must stay cheap.
"""
from __future__ import annotations

from dataclasses import dataclass

# ComfyUI's folder names under models/, per role (the loaders' keys), newest first: a file is looked for in each,
# and downloaded or written into the first.
FOLDERS: dict[str, tuple[str, ...]] = {
    "dit": ("diffusion_models", "unet"),
    "vae": ("vae",),
    "clip_l": ("text_encoders", "clip"),
    "t5xxl": ("text_encoders", "clip"),
}

# The Hugging Face repositories (checked against the Hub's file listings and ComfyUI's Kontext tutorial).
BFL_REPO = "black-forest-labs/FLUX.1-Kontext-dev"  # gated: the FLUX.1 [dev] Non-Commercial License
COMFY_FP8_REPO = "Comfy-Org/flux1-kontext-dev_ComfyUI"
TEXT_REPO = "comfyanonymous/flux_text_encoders"


@dataclass(frozen=True)
class ReleaseFile:
    name: str  # the file name under models/<FOLDERS[role][0]>/
    repo_id: str  # the Hugging Face repository it comes from
    repo_path: str  # its path inside that repository


DIT = ReleaseFile("flux1-kontext-dev.safetensors", BFL_REPO, "flux1-kontext-dev.safetensors")
DIT_FP8 = ReleaseFile("flux1-dev-kontext_fp8_scaled.safetensors", COMFY_FP8_REPO,
                      "split_files/diffusion_models/flux1-dev-kontext_fp8_scaled.safetensors")
VAE = ReleaseFile("ae.safetensors", BFL_REPO, "ae.safetensors")
CLIP_L = ReleaseFile("clip_l.safetensors", TEXT_REPO, "clip_l.safetensors")
T5XXL = ReleaseFile("t5xxl_fp16.safetensors", TEXT_REPO, "t5xxl_fp16.safetensors")
T5XXL_FP8 = ReleaseFile("t5xxl_fp8_e4m3fn_scaled.safetensors", TEXT_REPO, "t5xxl_fp8_e4m3fn_scaled.safetensors")

# The release set by role; fp8 swaps the two big files for ComfyUI's fp8-scaled ones (12 + 5 GB instead of 24 + 10).
RELEASE: dict[str, ReleaseFile] = {"dit": DIT, "vae": VAE, "clip_l": CLIP_L, "t5xxl": T5XXL}
RELEASE_FP8: dict[str, ReleaseFile] = {**RELEASE, "dit": DIT_FP8, "t5xxl": T5XXL_FP8}

# The two tokenizers: (folder in BFL_REPO, our folder under models/tokenizers/, its files).
TOKENIZERS_FOLDER = "tokenizers"
TOKENIZER_SOURCES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("tokenizer", "clip_l", ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")),
    ("tokenizer_2", "t5xxl", ("tokenizer.json", "special_tokens_map.json", "tokenizer_config.json")),
)

# make-tiny's stand-ins (DESIGN.md's contract), in the same folders.
TINY_DIT = "kontext-tiny.safetensors"  # BFL keys
TINY_DIT_FP8 = "kontext-tiny-fp8_scaled.safetensors"  # ComfyUI's fp8_scaled layout
TINY_DIT_DIFFUSERS = "kontext-tiny-diffusers"  # a diffusers folder
TINY_VAE = "ae-tiny.safetensors"
TINY_CLIP_L = "clip_l-tiny.safetensors"
TINY_T5XXL = "t5xxl-tiny.safetensors"

# What kontext.files looks for per role, best first: the release files, then the tiny ones.
CANDIDATES: dict[str, tuple[str, ...]] = {
    "dit": (DIT.name, DIT_FP8.name, TINY_DIT),
    "vae": (VAE.name, TINY_VAE),
    "clip_l": (CLIP_L.name, TINY_CLIP_L),
    "t5xxl": (T5XXL.name, T5XXL_FP8.name, TINY_T5XXL),
}
