"""The `edit` verb: `python -m kontext edit --image IN --prompt "..." --out OUT [models] [options]`.

Every argument is checked before any model is made or loaded (a wrong flag must not wait for 24 GB of weights), in
the command line's own words; then the models load, the edit runs with a progress bar, and --out is written
atomically.
"""
from __future__ import annotations

import importlib
import io
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError, KontextError
from .common import check_loras, check_writable, lora_spec, user_path

if TYPE_CHECKING:  # imported where used: they import torch
    from PIL import Image

    from ..params import SamplingParams
    from ..pipeline import KontextPipeline

log = logging.getLogger("kontext")

FILE_FLAGS = {"dit": "--dit", "vae": "--vae", "clip_l": "--clip-l", "t5xxl": "--t5xxl"}
TINY_PREFIX = "kontext-tiny-"  # the --tiny run's temporary models folder, under tempfile.gettempdir()


class ProgressBar:
    """A one-line text progress bar on stderr (no dependency), used as the pipeline's step callback."""

    def __init__(self, label: str = "denoising", stream=None):
        # sys.stderr looked up now, not at import: it may have been redirected since (pytest, a host program).
        self.label, self.stream, self.start = label, stream or sys.stderr, time.perf_counter()

    def __call__(self, step: int, total: int, _latent=None) -> None:
        done = step + 1
        filled = int(30 * done / total)
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} {elapsed:.1f}s")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()


class EngineChoices:
    """Argparse choices read from an engine module when first needed (checking a value, printing help).

    The engine's names are the one source (kontext.precision.PRECISIONS, kontext.ids.METHODS), but importing
    those modules imports torch, seconds that `--version`, `queue` and `download` should not pay.
    """

    def __init__(self, module: str, name: str, extra: tuple[str, ...] = ()):
        self.module, self.name, self.extra = module, name, extra

    def _names(self) -> tuple[str, ...]:
        return (*getattr(importlib.import_module(self.module), self.name), *self.extra)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, value: object) -> bool:
        return value in self._names()


def add_parser(sub) -> None:
    p = sub.add_parser("edit", help="edit images following an instruction (the main job)",
                       description="Edit one or more reference images following a text instruction.")
    p.add_argument("--image", action="append", default=[], type=user_path, metavar="IN",
                   help="reference image (repeatable; none = text to image)")
    p.add_argument("--prompt", required=True, help="the instruction, e.g. 'make it night'")
    p.add_argument("--out", required=True, type=user_path, help="output image (.png, .jpg, .webp, ...)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    m = p.add_argument_group("models (give --models, --tiny, or the four files)")
    m.add_argument("--models", type=user_path, help="a ComfyUI-style models/ folder holding the release files")
    m.add_argument("--tiny", action="store_true", help="make tiny random models and run on them (checks an install)")
    m.add_argument("--dit", type=user_path, help="flux1-kontext-dev.safetensors (BFL, fp8_scaled or diffusers folder)")
    m.add_argument("--vae", type=user_path, help="ae.safetensors")
    m.add_argument("--clip-l", type=user_path, help="clip_l.safetensors")
    m.add_argument("--t5xxl", type=user_path, help="t5xxl_fp16.safetensors")
    m.add_argument("--tokenizers", type=user_path,
                   help="tokenizer folder (default: the one in --models if any, else the copies in the package)")
    s = p.add_argument_group("sampling")
    # The defaults are SamplingParams' (tests/test_cli.py checks that they agree); literals here keep torch out of
    # the parser.
    s.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    s.add_argument("--steps", type=int, default=28, help="sampling steps (default: %(default)s)")
    s.add_argument("--guidance", type=float, default=2.5, help="embedded guidance (default: %(default)s)")
    s.add_argument("--width", type=int, help="output width (default: the first reference's, after resizing)")
    s.add_argument("--height", type=int, help="output height (default: likewise)")
    s.add_argument("--no-resize", action="store_true",
                   help="keep references at their size, cropped to multiples of 16 (default: resize each to the "
                        "nearest of Kontext's preferred resolutions)")
    s.add_argument("--reference-method", choices=EngineChoices("kontext.ids", "METHODS"), default="offset",
                   metavar="METHOD", help="how references are placed: %(choices)s (default: %(default)s)")
    s.add_argument("--negative-prompt", default=None, help="what to steer away from; needs --true-cfg above 1")
    s.add_argument("--true-cfg", type=float, default=1.0,
                   help="above 1: true CFG with --negative-prompt, a second model pass per step "
                        "(default: %(default)s, off)")
    s.add_argument("--denoise", type=float, default=1.0,
                   help="below 1: start from the first --image, noised to this level (default: %(default)s)")
    s.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available, else cpu)")
    s.add_argument("--precision", choices=EngineChoices("kontext.precision", "PRECISIONS", ("auto",)), default=None,
                   metavar="NAME", help="the DiT's weights and compute: %(choices)s (default: auto, the weights as "
                                        "the file stores them, computing in bf16 on a GPU, fp32 on the CPU)")
    s.add_argument("--dit-offload", choices=("none", "stream"), default="none",
                   help="stream: keep the DiT's blocks in CPU memory and stream them to the GPU block by block "
                        "(for 16 GB and 8 GB cards; slower) (default: %(default)s)")
    s.add_argument("--compile", action="store_true",
                   help="compile the DiT's blocks with torch.compile (one graph per block kind; the first step "
                        "of each size takes longer)")
    s.add_argument("--backend", choices=("torch", "tensorrt"), default="torch",
                   help="tensorrt: run the DiT as an engine built by build-engine (needs --engine and the "
                        "tensorrt package) (default: %(default)s)")
    s.add_argument("--engine", type=user_path, default=None, metavar="DIR",
                   help="with --backend tensorrt: the engine's .plan or its folder (one that fits this GPU is "
                        "picked)")
    s.add_argument("--lora", action="append", default=[], type=lora_spec, metavar="FILE[:STRENGTH]",
                   help="a LoRA (ComfyUI/BFL, kohya, diffusers/PEFT, xlabs layouts) with its strength (default 1); "
                        "repeatable, the LoRAs stack")
    p.set_defaults(run=run)


def run(args) -> int:
    """Check every argument, then load the models, edit, and write --out."""
    check_model_source(args)
    params = sampling_params(args)
    check_images(args.image)
    fmt = check_output(args.out, args.overwrite)
    check_device(args.device)
    check_loras(args.lora)
    check_backend(args)
    references = load_references(args.image)
    t0 = time.perf_counter()
    with tiny_models() if args.tiny else nullcontext() as tiny_dir:
        pipe = load_pipeline(args, tiny_dir)
        log.info("models loaded in %.1fs", time.perf_counter() - t0)
        images = pipe.edit(args.prompt, references, seed=params.seed, steps=params.steps,
                           guidance=params.guidance, width=params.width, height=params.height,
                           resize_references=not args.no_resize, reference_method=params.reference_method,
                           negative_prompt=args.negative_prompt, true_cfg=params.true_cfg,
                           denoise=params.denoise, callback=ProgressBar())
    save_image(images[0], args.out, fmt)
    print(f"wrote {args.out} ({images[0].width}x{images[0].height}) in {time.perf_counter() - t0:.1f}s")
    return 0


def check_backend(args) -> None:
    """--backend tensorrt: an engine, tensorrt installed, and none of what an engine cannot do."""
    if args.backend != "tensorrt":
        if args.engine is not None:
            raise InputError("--engine runs with --backend tensorrt; add it, or drop --engine")
        return
    if args.engine is None:
        raise InputError("--backend tensorrt needs --engine DIR (built by `python -m kontext build-engine`)")
    if not args.engine.exists():
        raise InputError(f"--engine {args.engine}: no such file or folder")
    if args.tiny:
        raise InputError("--tiny makes new random models, which no engine was built from: drop --tiny")
    from ..tensorrt import check_request
    from ..tensorrt.build import import_tensorrt

    check_request(args.device, args.lora, args.dit_offload, args.compile)

    import_tensorrt()  # the install hint now, not after the text encoders have loaded


def check_model_source(args) -> None:
    """Exactly one of --tiny, --models, the four files; an option that would be ignored is named."""
    files = [flag for role, flag in FILE_FLAGS.items() if getattr(args, role) is not None]
    if args.tiny and (args.models or files):
        given = ["--models"] * bool(args.models) + files
        raise InputError(f"--tiny makes its own models: drop {' '.join(given)}, or drop --tiny")
    if args.models and files:
        raise InputError(f"--models finds the model files itself: give --models or {' '.join(files)}, not both")
    if not args.tiny and not args.models and len(files) < len(FILE_FLAGS):
        missing = [flag for flag in FILE_FLAGS.values() if flag not in files]
        raise InputError("give --models DIR, --tiny, or all of --dit --vae --clip-l --t5xxl "
                         f"(missing: {', '.join(missing)})")
    if args.models is not None:
        from ..files import find_model_files

        find_model_files(args.models)  # a missing file is named now (from_models_dir looks again, cheaply)
    for role, flag in FILE_FLAGS.items():  # each file now, not after the 24 GB DiT has loaded
        path = getattr(args, role)
        if path is not None and not path.exists():
            raise InputError(f"{flag} {path}: no such file or folder")
    if args.tokenizers is not None:
        if args.tiny:
            # The tiny text encoders have tiny vocabularies: only make-tiny's own tokenizers fit them.
            log.warning("--tokenizers is ignored with --tiny (the tiny models bring their own tokenizers)")
        else:
            from ..text.tokenizers import find_tokenizer_dirs

            find_tokenizer_dirs(args.tokenizers)  # a wrong folder is named now, not after the weights load


def sampling_params(args) -> SamplingParams:
    """Every number through the engine's one set of rules, in flag names; warnings for options that do nothing."""
    from ..params import CLI, SamplingParams

    p = SamplingParams(steps=args.steps, guidance=args.guidance, true_cfg=args.true_cfg, denoise=args.denoise,
                       seed=args.seed, reference_method=args.reference_method, width=args.width,
                       height=args.height).validated(CLI)
    if p.denoise < 1.0 and not args.image:
        raise InputError(f"--denoise {p.denoise:g} starts from the first --image: give one, or leave --denoise at 1")
    if args.negative_prompt is not None and not p.true_cfg_on:
        log.warning("--negative-prompt is ignored without --true-cfg above 1 (e.g. --true-cfg 1.5)")
    if p.true_cfg_on and args.negative_prompt is None:
        log.warning("--true-cfg %g is ignored without --negative-prompt (--negative-prompt '' steers away from "
                    "the empty prompt)", p.true_cfg)
        p = replace(p, true_cfg=1.0)  # the engine would warn again; it is off either way
    if args.no_resize and not args.image:
        log.warning("--no-resize is ignored without an --image")
    return p


def check_images(images: list[Path]) -> None:
    for img in images:
        if not img.exists():
            raise InputError(f"--image {img}: no such file")
        if not img.is_file():
            raise InputError(f"--image {img} is not a file")


def load_references(images: list[Path]) -> list[Image.Image]:
    """The --image files, decoded now: a file that is not a picture should not wait for the models to load."""
    from ..references import load_image

    return [load_image(img) for img in images]


def check_device(device: str | None) -> None:
    if device is not None:
        from ..weights.loading import as_device

        as_device(device)


# ---------------------------------------------------------------------------------------------- edit: output

def check_output(out: Path, overwrite: bool) -> str:
    """The PIL format for --out, once the file is known to be writable: all before any model work."""
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; give a file name such as {out / 'edited.png'}")
    if out.exists() and not overwrite:
        raise InputError(f"--out {out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: the folder {out.parent} does not exist")
    check_writable(out.parent, f"--out {out}")
    return output_format(out)


def output_format(out: Path) -> str:
    """The PIL format for --out's suffix (.png, .jpg, .webp, ...), proven by encoding a 1x1 picture.

    PIL's extension table lists formats it cannot write (.h5 and .xbm are there, but saving an RGB image as either
    fails), so the table alone would let a run fail at its very end.
    """
    from PIL import Image

    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise InputError(f"--out {out}: unknown image type {out.suffix or '(no suffix)'}; use .png, .jpg or .webp")
    try:
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=fmt)
    except Exception as exc:  # each plugin fails its own way (OSError, ValueError, KeyError...)
        raise InputError(f"--out {out}: cannot write {out.suffix} images ({exc or type(exc).__name__}); "
                         "use .png, .jpg or .webp") from None
    return fmt


def save_image(image: Image.Image, out: Path, fmt: str) -> None:
    # Write next to the target, then move: an interrupted save never leaves a half-written file under --out.
    partial = out.with_name(f".{out.name}.partial")
    try:
        image.save(partial, format=fmt)
        partial.replace(out)
    except OSError as exc:  # permissions changed during the run, a full disk
        raise KontextError(f"cannot write --out {out}: {exc.strerror or exc}") from None
    finally:
        with suppress(OSError):
            partial.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- edit: models

@contextmanager
def tiny_models() -> Iterator[Path]:
    """make-tiny's models in a temporary folder (TINY_PREFIX*, under TMPDIR), removed afterwards."""
    from .. import tiny

    with tempfile.TemporaryDirectory(prefix=TINY_PREFIX) as tmp:
        tiny.make_tiny(tmp)
        yield Path(tmp)


def load_pipeline(args, tiny_dir: Path | None) -> KontextPipeline:
    from ..pipeline import KontextPipeline

    device = {"device": args.device, "precision": args.precision, "loras": list(args.lora),
              "dit_offload": args.dit_offload, "compile": args.compile}
    if args.backend == "tensorrt":
        device.update(backend="tensorrt", engine=args.engine)
    if tiny_dir is not None:
        return KontextPipeline.from_models_dir(tiny_dir, **device)
    if args.models is not None:
        return KontextPipeline.from_models_dir(args.models, tokenizers=args.tokenizers, **device)
    return KontextPipeline.from_files(args.dit, args.vae, args.clip_l, args.t5xxl, tokenizers=args.tokenizers,
                                      **device)
