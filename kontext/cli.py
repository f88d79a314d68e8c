"""Command line: `python -m kontext VERB ...` (edit, make-tiny, download, queue)."""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

from .errors import Cancelled, InputError, KontextError

log = logging.getLogger("kontext")


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


def add_edit(sub) -> None:
    p = sub.add_parser("edit", help="edit images following an instruction (the main job)",
                       description="Edit one or more reference images following a text instruction.")
    p.add_argument("--image", action="append", default=[], metavar="IN", help="reference image (repeatable; none = text to image)")
    p.add_argument("--prompt", required=True, help="the instruction, e.g. 'make it night'")
    p.add_argument("--out", required=True, type=Path, help="output image (.png, .jpg, .webp, ...)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    m = p.add_argument_group("models (give --models, --tiny, or the four files)")
    m.add_argument("--models", type=Path, help="a ComfyUI-style models/ folder holding the release files")
    m.add_argument("--tiny", action="store_true", help="make tiny random models and run on them (checks an install)")
    m.add_argument("--dit", type=Path, help="flux1-kontext-dev.safetensors (BFL, fp8_scaled or diffusers folder)")
    m.add_argument("--vae", type=Path, help="ae.safetensors")
    m.add_argument("--clip-l", type=Path, help="clip_l.safetensors")
    m.add_argument("--t5xxl", type=Path, help="t5xxl_fp16.safetensors")
    m.add_argument("--tokenizers", type=Path, help="tokenizer folder (default: found automatically)")
    s = p.add_argument_group("sampling")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=28)
    s.add_argument("--guidance", type=float, default=2.5, help="embedded guidance (Kontext default 2.5)")
    s.add_argument("--width", type=int, help="output width (default: the first reference's, after resizing)")
    s.add_argument("--height", type=int, help="output height")
    s.add_argument("--no-resize", action="store_true", help="keep references at their size (cropped to 16 px)")
    s.add_argument("--reference-method", choices=("offset", "index"), default="offset")
    s.add_argument("--negative-prompt", default=None)
    s.add_argument("--true-cfg", type=float, default=1.0, help="> 1 enables true CFG with --negative-prompt")
    s.add_argument("--denoise", type=float, default=1.0, help="< 1 starts from the first image, noised")
    s.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    s.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None)
    p.set_defaults(run=run_edit)


def run_edit(args) -> int:
    from .pipeline import KontextPipeline

    out: Path = args.out
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; give a file name such as {out / 'edited.png'}")
    if out.exists() and not args.overwrite:
        raise KontextError(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.exists():
        raise KontextError(f"output folder {out.parent} does not exist")
    for img in args.image:
        if not Path(img).exists():
            raise KontextError(f"reference image {img} does not exist")
        if not Path(img).is_file():
            raise InputError(f"reference image {img} is not a file")
    check_numbers(args)
    fmt = output_format(out)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from .tiny import make_tiny

            make_tiny(tmp)
            pipe = KontextPipeline.from_models_dir(tmp, device=args.device, precision=args.precision)
        elif args.models:
            pipe = KontextPipeline.from_models_dir(args.models, device=args.device, precision=args.precision)
        else:
            missing = [n for n in ("dit", "vae", "clip_l", "t5xxl") if getattr(args, n) is None]
            if missing:
                raise KontextError("give --models DIR, --tiny, or all of --dit --vae --clip-l --t5xxl "
                                   f"(missing: {', '.join('--' + m.replace('_', '-') for m in missing)})")
            pipe = KontextPipeline.from_files(args.dit, args.vae, args.clip_l, args.t5xxl, args.tokenizers,
                                              device=args.device, precision=args.precision)
        log.info("models loaded in %.1fs", time.perf_counter() - t0)
        images = pipe.edit(args.prompt, args.image, seed=args.seed, steps=args.steps, guidance=args.guidance,
                           width=args.width, height=args.height, resize_references=not args.no_resize,
                           reference_method=args.reference_method, negative_prompt=args.negative_prompt,
                           true_cfg=args.true_cfg, denoise=args.denoise, callback=ProgressBar())
    # Write next to the target, then move: an interrupted save never leaves a half-written file under --out.
    tmp_out = out.with_name(f".{out.name}.partial")
    images[0].save(tmp_out, format=fmt)
    tmp_out.replace(out)
    print(f"wrote {out} ({images[0].width}x{images[0].height}) in {time.perf_counter() - t0:.1f}s")
    return 0


def output_format(out: Path) -> str:
    """The PIL format for --out's suffix (.png, .jpg, .webp, ...), checked before any work is done."""
    from PIL import Image

    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise InputError(f"--out {out}: unknown image type {out.suffix or '(no suffix)'}; use .png, .jpg or .webp")
    return fmt


def check_numbers(args) -> None:
    """Reject impossible numbers before the models load (a minute at full size), not after."""
    from .references import MAX_SIDE, MIN_SIDE, MULTIPLE

    if args.steps < 1:
        raise InputError(f"--steps must be at least 1, got {args.steps}")
    for name in ("width", "height"):
        value = getattr(args, name)
        if value is not None and not MIN_SIDE <= value // MULTIPLE * MULTIPLE <= MAX_SIDE:
            raise InputError(f"--{name} {value} is outside the supported {MIN_SIDE}..{MAX_SIDE} "
                               f"(sizes are floored to multiples of {MULTIPLE})")


def add_make_tiny(sub) -> None:
    p = sub.add_parser("make-tiny", help="write tiny random models in the release layouts (for tests)")
    p.add_argument("out_dir", type=Path, help="folder to fill like ComfyUI's models/")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=lambda a: _make_tiny(a.out_dir, a.seed))


def _make_tiny(out_dir: Path, seed: int) -> int:
    from .tiny import make_tiny

    for role, path in make_tiny(out_dir, seed).items():
        print(f"{role:14s} {path}")
    return 0


def add_download(sub) -> None:
    p = sub.add_parser("download", help="fetch the release files from the Hugging Face Hub into a models/ folder")
    p.add_argument("--to", type=Path, required=True, help="ComfyUI models/ folder")
    p.add_argument("--fp8", action="store_true", help="the fp8_scaled DiT and T5 (half the size)")
    p.add_argument("--token", default=None, help="Hugging Face token (default: HF_TOKEN / the cached login)")
    p.set_defaults(run=run_download)


def run_download(args) -> int:
    from .hub import download

    for role, path in download(args.to, fp8=args.fp8, token=args.token).items():
        print(f"{role:14s} {path}")
    return 0


def add_queue(sub) -> None:
    from . import cli_queue

    p = sub.add_parser("queue", help="queue a workflow on a ComfyUI server and download its images")
    cli_queue.add_arguments(p)
    p.set_defaults(run=cli_queue.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kontext", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)
    for add in (add_edit, add_make_tiny, add_download, add_queue):
        add(sub)
    for p in sub.choices.values():  # accepted after any verb
        p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.run(args)
    except Cancelled:
        print("cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except KontextError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MemoryError as exc:  # torch.OutOfMemoryError (GPU) is a RuntimeError; a CPU one is MemoryError
        print(f"error: out of memory ({exc}); try a smaller --width/--height or fewer references", file=sys.stderr)
        return 3
    except RuntimeError as exc:
        if type(exc).__name__ != "OutOfMemoryError":
            raise
        print("error: out of GPU memory; try a smaller --width/--height, fewer references, or --device cpu",
              file=sys.stderr)
        return 3
