"""Download the release weights from the Hugging Face Hub into ComfyUI's `models/` folder layout.

Files land under their final names (`<to>/diffusion_models/flux1-kontext-dev.safetensors`, ...), as real files:
ComfyUI lists what is in its folders and cannot follow the Hub cache's hash-named blobs, and a second copy in the
cache would double 24 GB of disk. Each file is fetched with `hf_hub_download(local_dir=...)` into a staging folder
`<to>/.kontext-download/` (which ComfyUI never scans), resumable there if interrupted, and then renamed into
place, so a half-downloaded file never appears under a name ComfyUI would load. Files already in place whose
safetensors header is intact and whose size matches it are skipped without touching the network.

Sources (kontext.release lists them):
- black-forest-labs/FLUX.1-Kontext-dev: flux1-kontext-dev.safetensors, ae.safetensors. Gated: log in on the model
  page, accept the FLUX.1 [dev] Non-Commercial License, and use a token (--token or HF_TOKEN).
- Comfy-Org/flux1-kontext-dev_ComfyUI: split_files/diffusion_models/flux1-dev-kontext_fp8_scaled.safetensors.
- comfyanonymous/flux_text_encoders: clip_l.safetensors, t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn_scaled.safetensors.
- The tokenizers come from the BFL repository's tokenizer/ and tokenizer_2/ folders into models/tokenizers/.
"""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError, InputError, KontextError
from .release import BFL_REPO, FOLDERS, RELEASE, RELEASE_FP8, TOKENIZER_SOURCES, TOKENIZERS_FOLDER
from .weights.checkpoint import read_header

logger = logging.getLogger(__name__)

STAGING = ".kontext-download"


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    filename: str  # path inside the repository
    folder: str  # ComfyUI models/ subfolder
    name: str  # final file name

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}"

    def target(self, root: Path) -> Path:
        return root / self.folder / self.name


def release_files(fp8: bool = False) -> dict[str, HubFile]:
    """What `download` fetches, keyed like the loaders (load_dit, load_vae, load_clip_l, load_t5xxl).

    fp8=True swaps the two big files for ComfyUI's fp8-scaled ones (12 + 5 GB instead of 24 + 10 GB); the VAE and
    CLIP-L are the same either way, and the VAE still comes from the gated BFL repository.
    """
    return {role: HubFile(f.repo_id, f.repo_path, FOLDERS[role][0], f.name)
            for role, f in (RELEASE_FP8 if fp8 else RELEASE).items()}


# The two tokenizers, from the BFL repository's tokenizer/ and tokenizer_2/ into our layout under models/tokenizers/
# (ComfyUI ships its own copies in its code tree; the command line and the library need these when run alone).
TOKENIZER_FILES = tuple(HubFile(BFL_REPO, f"{src}/{name}", f"{TOKENIZERS_FOLDER}/{dst}", name)
                        for src, dst, names in TOKENIZER_SOURCES for name in names)


def download(to: Path, fp8: bool = False, token: str | None = None, progress: bool = True) -> dict[str, Path]:
    """Fetch the release files into `to` (ComfyUI's `models/` folder); return where each one is.

    token=None uses HF_TOKEN or a stored `hf auth login`. Gated or refused downloads raise InputError saying what
    to do; other failures raise KontextError, and running again resumes where the download stopped.
    """
    import huggingface_hub  # here, not at import time: `import kontext` must stay cheap
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    root = Path(to).expanduser()
    staging = root / STAGING
    done: dict[str, Path] = {}
    bars_were_off = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        with hub_logs_once():  # the Hub's retry warnings: once each
            wanted = list(release_files(fp8).items()) + [("tokenizers", f) for f in TOKENIZER_FILES]
            for key, f in wanted:
                final = f.target(root)
                if _complete(final):
                    logger.info("%s: already complete, skipped", final)
                    done[key] = root / TOKENIZERS_FOLDER if key == "tokenizers" else final
                    continue
                logger.info("downloading %s/%s -> %s", f.repo_id, f.filename, final)
                local = staging / f.repo_id.replace("/", "--")
                try:
                    got = huggingface_hub.hf_hub_download(f.repo_id, f.filename, local_dir=local, token=token)
                except Exception as exc:
                    raise _explain(exc, f) from exc
                _move(Path(got), final)
                done[key] = root / TOKENIZERS_FOLDER if key == "tokenizers" else final
    finally:
        if not progress and not bars_were_off:
            enable_progress_bars()
    shutil.rmtree(staging, ignore_errors=True)  # only reached when every file is in place
    return done


@contextmanager
def hub_logs_once() -> Iterator[None]:
    """Print each huggingface_hub message (its "Retrying in 1s" warnings) once, not twice.

    huggingface_hub gives its logger a handler of its own and also lets records propagate, so once the application
    has configured logging (python -m kontext does) every message reaches stderr through both. While this is
    active, its records go only to the application's handlers, in the application's format, when it has any.
    """
    hub_logger = logging.getLogger("huggingface_hub")
    own = list(hub_logger.handlers) if hub_logger.propagate and logging.getLogger().handlers else []
    for handler in own:
        hub_logger.removeHandler(handler)
    try:
        yield
    finally:
        for handler in own:
            hub_logger.addHandler(handler)


def _complete(path: Path) -> bool:
    """True for a present file whose safetensors header is valid and whose size covers all the data it declares."""
    if not path.is_file():
        return False
    if path.suffix != ".safetensors":  # a small tokenizer file: moved into place only once complete
        return path.stat().st_size > 0
    try:
        read_header(path)
    except CheckpointError as exc:
        logger.warning("%s is incomplete or damaged (%s); downloading it again", path, exc.problem)
        return False
    return True


def _move(src: Path, final: Path) -> None:
    """Rename into place; across filesystems (a symlinked models folder) copy to a .part name first."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, final)
    except OSError:
        part = final.with_name(final.name + ".part")
        shutil.copyfile(src, part)
        os.replace(part, final)
        src.unlink()


def _explain(exc: Exception, f: HubFile) -> KontextError:
    """The Hub's exception as an error that says what to do."""
    from huggingface_hub import errors as hf

    status = getattr(getattr(exc, "response", None), "status_code", None)
    what = f"{f.repo_id}/{f.filename}"
    access = (f"{f.url} is gated: log in on that page and accept the licence, then pass a token with read access "
              "(--token, or set HF_TOKEN)")
    if isinstance(exc, hf.GatedRepoError) or status in (401, 403):
        return InputError(f"cannot download {what}: access refused. {access}")
    if isinstance(exc, hf.RepositoryNotFoundError):
        return InputError(f"cannot download {what}: the repository is not found or not visible with this token "
                          f"(a mistyped or expired token?). If it is gated: {access}")
    if isinstance(exc, hf.LocalEntryNotFoundError):  # offline mode, or no connection at all
        return KontextError(f"cannot download {what}: the Hugging Face Hub is unreachable ({exc}). Check the "
                            "connection (and HF_HUB_OFFLINE), then run again: finished files are kept")
    if isinstance(exc, (hf.EntryNotFoundError, hf.RevisionNotFoundError)):
        return KontextError(f"cannot download {what}: the file is not in the repository (has it been renamed?)")
    return KontextError(f"download of {what} failed: {type(exc).__name__}: {exc}. Run again to resume")
