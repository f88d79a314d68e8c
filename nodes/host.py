"""What the host (ComfyUI) offers the nodes, with stand-ins when it is absent.

Every ComfyUI module is imported lazily, inside a function, so the node classes import and run in plain Python (the
tests, a script). Without ComfyUI: model lists come from $KONTEXT_MODELS_DIR (a folder laid out like ComfyUI's
`models/`), progress is logged, there are no previews, and nothing can interrupt a run.
"""
from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from types import ModuleType

import torch

from kontext.errors import InputError

log = logging.getLogger(__name__)

MODELS_ENV = "KONTEXT_MODELS_DIR"
WEIGHT_SUFFIXES = (".safetensors", ".sft")


def comfy(name: str) -> ModuleType | None:
    """A ComfyUI module (e.g. "folder_paths", "comfy.model_management") or None outside ComfyUI."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# ---------------------------------------------------------------------------------------------- model files

def _fallback_dirs(folder: str) -> list[Path]:
    root = os.environ.get(MODELS_ENV)
    if not root:
        return []
    names = {"diffusion_models": ("diffusion_models", "unet"), "text_encoders": ("text_encoders", "clip")}
    return [Path(root) / n for n in names.get(folder, (folder,))]


def model_dirs(folder: str) -> list[Path]:
    """The folders searched for one kind of model (ComfyUI's, with extra_model_paths.yaml entries)."""
    fp = comfy("folder_paths")
    if fp is not None:
        try:
            return [Path(p) for p in fp.get_folder_paths(folder)]
        except KeyError:
            return []
    return _fallback_dirs(folder)


def _diffusers_folders(dirs: list[Path]) -> list[str]:
    """Diffusers-layout model folders (config.json + safetensors) one level below the search folders.

    ComfyUI lists single files only; a diffusers `transformer/` folder is a model too, so it is offered as "name/".
    """
    found = []
    for d in dirs:
        if not d.is_dir():
            continue
        for sub in sorted(d.iterdir()):
            if sub.is_dir() and (sub / "config.json").is_file() and any(sub.glob("*.safetensors*")):
                found.append(sub.name + "/")
    return found


def model_list(folder: str, folders_too: bool = False) -> list[str]:
    """Names of the .safetensors models of one kind, as ComfyUI lists them (relative to the model folders)."""
    fp = comfy("folder_paths")
    if fp is not None:
        try:
            names = [n for n in fp.get_filename_list(folder) if n.lower().endswith(WEIGHT_SUFFIXES)]
        except KeyError:
            names = []
    else:
        names = sorted({str(p.relative_to(d)).replace(os.sep, "/")
                        for d in _fallback_dirs(folder) if d.is_dir()
                        for p in d.rglob("*") if p.is_file() and p.name.lower().endswith(WEIGHT_SUFFIXES)})
    if folders_too:
        folders = _diffusers_folders(model_dirs(folder))
        # A diffusers folder's shards are not models on their own: list the folder instead of its files.
        names = [n for n in names if n.split("/", 1)[0] + "/" not in folders] + folders
    return sorted(names)


def model_path(folder: str, name: str, what: str) -> Path:
    """The full path of a listed model name; a clear error naming the searched folders when it is not there."""
    if not isinstance(name, str) or not name:
        raise InputError(f"no {what} selected: pick one of the files in models/{folder}")
    rel = Path(name.rstrip("/"))
    if rel.is_absolute() or ".." in rel.parts:
        raise InputError(f"{what} {name!r}: expected a name from the models/{folder} list, not a path")
    dirs = model_dirs(folder)
    for d in dirs:
        p = d / rel
        if (p.is_file() and not name.endswith("/")) or (p.is_dir() and name.endswith("/")):
            return p
    searched = ", ".join(str(d) for d in dirs) or f"(none: ComfyUI is not running and ${MODELS_ENV} is not set)"
    raise InputError(f"{what} {name!r} not found in models/{folder}; searched: {searched}. "
                     "Put the file there and press R in ComfyUI to refresh the list.")


ENGINE_FOLDER = "tensorrt"  # models/tensorrt, as ComfyUI_TensorRT names it


def engine_dirs() -> list[Path]:
    """Where engines built by `python -m kontext build-engine` are looked for: ComfyUI's models/tensorrt (and
    extra_model_paths.yaml entries for it), registered or not."""
    fp = comfy("folder_paths")
    if fp is not None:
        return model_dirs(ENGINE_FOLDER) or [Path(fp.models_dir) / ENGINE_FOLDER]
    return _fallback_dirs(ENGINE_FOLDER)


def engine_list() -> list[str]:
    """The engines (a .plan with its .json sidecar) in the engine folders, relative to them. Listed directly, not
    through folder_paths: another pack may register the folder for its own file type."""
    return sorted({str(p.relative_to(d)).replace(os.sep, "/") for d in engine_dirs() if d.is_dir()
                   for p in d.rglob("*.plan") if p.with_suffix(".json").is_file()})


def engine_path(name: str) -> Path:
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise InputError(f"engine {name!r}: expected a name from the models/{ENGINE_FOLDER} list, not a path")
    for d in engine_dirs():
        if (d / rel).is_file():
            return d / rel
    raise InputError(f"engine {name!r} not found in models/{ENGINE_FOLDER}; build one with `python -m kontext "
                     "build-engine --onnx MODEL.onnx --comfyui <your ComfyUI folder>`")


def fingerprint(path: Path) -> str:
    """Changes when the file (or any file of a folder model) is replaced or rewritten."""
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    parts = []
    for f in files:
        if f.is_file():
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


# ---------------------------------------------------------------------------------------------- run control

def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException when the user pressed Cancel (no-op outside ComfyUI)."""
    mm = comfy("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


class Progress:
    """ComfyUI's progress bar with a live latent preview, as the step callback of kontext's sampler.

    Previews use ComfyUI's own previewer for the Flux latent format (so its Latent2RGB factors, a TAEF1 decoder
    when installed, and the user's preview setting all apply). Each call first checks for Cancel.
    """

    def __init__(self, total: int, device: torch.device | None = None):
        self.total = total
        self.bar = self.previewer = self.latent_format = None
        utils = comfy("comfy.utils")
        if utils is not None:
            self.bar = utils.ProgressBar(total)
        formats, previews = comfy("comfy.latent_formats"), comfy("latent_preview")
        if formats is not None and previews is not None:
            try:
                self.latent_format = formats.Flux()
                self.previewer = previews.get_previewer(device or torch.device("cpu"), self.latent_format)
            except Exception as exc:  # previews are a nicety: never fail a run over one
                log.warning("Kontext: no live previews (%s)", exc)
                self.previewer = None

    def __call__(self, step: int, total: int, latent_raw: torch.Tensor | None = None) -> None:
        check_interrupt()
        if self.bar is None:
            log.debug("Kontext: step %d/%d", step + 1, total)
            return
        preview = None
        if self.previewer is not None and latent_raw is not None:
            try:
                x0 = self.latent_format.process_in(latent_raw[:1])  # raw -> the model space the factors expect
                preview = self.previewer.decode_latent_to_preview_image("JPEG", x0)
            except Exception as exc:
                log.warning("Kontext: preview failed, previews off for this run (%s)", exc)
                self.previewer = None
        self.bar.update_absolute(step + 1, total, preview)
