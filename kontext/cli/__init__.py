"""Command line: `python -m kontext VERB ...` (edit, make-tiny, download, queue, quantize, bench, export-onnx,
build-engine): the
dispatcher, the small verbs, and the helpers they share; edit, queue, quantize and bench live in cli_<verb>.py,
export-onnx and build-engine in cli_trt.py.

Exit statuses, for every verb: 0 success; 2 a mistake the user can fix (a bad option, a missing or unwritable
file, a refused download), printed as one "error: ..." line; 3 out of memory; 130 interrupted (Ctrl-C, or a
callback's Cancelled); 143 terminated (SIGTERM); 1 only for a bug, with Python's traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import __version__
from .errors import Cancelled, InputError, KontextError

log = logging.getLogger("kontext")

EXIT_TERMINATED = 128 + signal.SIGTERM  # the shell's status for a SIGTERM'd process: 143


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that `with` and `finally` clean-ups run (temporary folders, partial
    files). A BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it."""


def user_path(text: str) -> Path:
    """A path as typed: `~` expanded even where the shell left it (quoted, or after `--flag=`)."""
    return Path(text).expanduser()


# ---------------------------------------------------------------------------------------------- edit: arguments

def check_writable(folder: Path, what: str) -> None:
    """Create and remove a file in `folder`: the only test that sees read-only mounts, ACLs and quotas."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".kontext-write-test-", dir=folder)
    except OSError as exc:
        raise InputError(f"{what}: cannot write in {folder} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def check_target_folder(folder: Path, what: str) -> None:
    """A folder to create or fill: it, or its nearest existing parent, must be a writable folder."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{what} {folder} exists and is not a folder")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"{what} {folder}: cannot create it, {existing} is not a folder")
    check_writable(existing, f"{what} {folder}")


def add_edit(sub) -> None:
    from . import cli_edit

    cli_edit.add_edit(sub)


def add_make_tiny(sub) -> None:
    p = sub.add_parser("make-tiny", help="write tiny random models in the release layouts (for tests)")
    p.add_argument("out_dir", type=user_path, help="folder to fill like ComfyUI's models/ (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    p.set_defaults(run=lambda a: run_make_tiny(a.out_dir, a.seed))


def run_make_tiny(out_dir: Path, seed: int) -> int:
    from . import tiny
    from .params import MAX_SEED, integer

    integer(seed, "--seed", 0, MAX_SEED)
    check_target_folder(out_dir, "make-tiny:")
    try:
        paths = tiny.make_tiny(out_dir, seed)
    except OSError as exc:  # a full disk, or a folder made read-only during the run
        raise KontextError(f"make-tiny: cannot write to {out_dir}: {os_reason(exc)}") from None
    for role, path in paths.items():
        print(f"{role:14s} {path}")
    return 0


def add_download(sub) -> None:
    p = sub.add_parser("download", help="fetch the release files from the Hugging Face Hub into a models/ folder")
    p.add_argument("--to", type=user_path, required=True, help="ComfyUI models/ folder (created if missing)")
    p.add_argument("--fp8", action="store_true", help="the fp8_scaled DiT and T5 (half the size)")
    p.add_argument("--token", default=None, help="Hugging Face token (default: HF_TOKEN / the cached login)")
    p.set_defaults(run=run_download)


def run_download(args) -> int:
    from . import hub

    check_target_folder(args.to, "--to")  # before the first request, not after a 24 GB download
    try:
        files = hub.download(args.to, fp8=args.fp8, token=args.token)
    except OSError as exc:  # the Hub's own failures arrive as KontextErrors; these are the local disk's
        raise KontextError(f"download into {args.to} failed: {os_reason(exc)}") from None
    for role, path in files.items():
        print(f"{role:14s} {path}")
    return 0


def os_reason(exc: OSError) -> str:
    return f"{exc.strerror} ({exc.filename})" if exc.strerror and exc.filename else str(exc)


def add_queue(sub) -> None:
    from . import cli_queue

    p = sub.add_parser("queue", help="queue a workflow on a ComfyUI server and download its images")
    cli_queue.add_arguments(p)
    p.set_defaults(run=cli_queue.run)


# ---------------------------------------------------------------------------------------------- dispatch

def add_quantize(sub) -> None:
    from . import cli_quantize

    p = sub.add_parser("quantize", help="write a DiT as fp8 or NVFP4 in ComfyUI's mixed-precision layout",
                       description="Quantise a Kontext DiT to fp8 or fp4 (NVFP4), streaming tensor by tensor; the "
                                   "file loads in ComfyUI's UNETLoader and in this pack.")
    cli_quantize.add_arguments(p)
    p.set_defaults(run=cli_quantize.run)


def add_bench(sub) -> None:
    from . import cli_bench

    p = sub.add_parser("bench", help="time the DiT per precision on random weights, against diffusers and ComfyUI",
                       description="Time one denoising step and a whole edit at each precision on a DiT with random "
                                   "weights built on the device (no download), with diffusers' and ComfyUI's Flux "
                                   "on the same weights in the same process.")
    cli_bench.add_arguments(p)
    p.set_defaults(run=cli_bench.run)


def add_tensorrt(sub) -> None:
    from . import cli_trt

    cli_trt.add_export(sub, user_path)
    cli_trt.add_build(sub, user_path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kontext", description=__doc__.split("\n\n")[0],
                                     epilog="exit status: 0 done, 2 a mistake to fix (see the error line), 3 out of "
                                            "memory, 130 interrupted, 143 terminated, 1 a bug")
    parser.add_argument("--version", action="version", version=f"kontext {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True)
    for add in (add_edit, add_make_tiny, add_download, add_queue, add_quantize, add_bench, add_tensorrt):
        add(sub)
    for p in sub.choices.values():  # accepted after any verb
        p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    return parser


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While active, SIGTERM (kill, docker stop, systemd) raises Terminated in the main thread.

    Python's default for SIGTERM is to die on the spot, leaving the --tiny run's temporary models and partial files
    behind. Only the first signal raises: a second one must not cut short the clean-up the first one started.
    """
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread only
        yield
        return
    fired = False

    def handler(_signum, _frame) -> None:
        nonlocal fired
        if not fired:
            fired = True
            raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    with sigterm_raises():
        return dispatch(args)


def dispatch(args) -> int:
    """Run the verb; every expected failure becomes one line on stderr and its exit status."""
    try:
        return args.run(args)
    except Cancelled:
        print("cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("\nterminated", file=sys.stderr)
        return EXIT_TERMINATED
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
