"""What the verbs share: paths as typed, writable-folder checks, LoRA specs, and turning failures into exit statuses.

Exit statuses, for every verb: 0 success; 2 a mistake the user can fix (a bad option, a missing or unwritable
file, a refused download), printed as one "error: ..." line; 3 out of memory; 130 interrupted (Ctrl-C, or a
callback's Cancelled); 143 terminated (SIGTERM); 1 only for a bug, with Python's traceback.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import Cancelled, InputError, KontextError

log = logging.getLogger("kontext")

EXIT_TERMINATED = 128 + signal.SIGTERM  # the shell's status for a SIGTERM'd process: 143


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that `with` and `finally` clean-ups run (temporary folders, partial
    files). A BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it."""


# ---------------------------------------------------------------------------------------------- paths

def user_path(text: str) -> Path:
    """A path as typed: `~` expanded even where the shell left it (quoted, or after `--flag=`)."""
    return Path(text).expanduser()


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


def os_reason(exc: OSError) -> str:
    return f"{exc.strerror} ({exc.filename})" if exc.strerror and exc.filename else str(exc)


# ---------------------------------------------------------------------------------------------- LoRAs

def lora_spec(text: str) -> tuple[Path, float]:
    """FILE[:STRENGTH] -> (path, strength); a colon inside the path is kept when no number follows it."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            return user_path(path), float(tail)
        except ValueError:
            pass
    return user_path(text), 1.0


def check_loras(loras: list[tuple[Path, float]]) -> None:
    """Each --lora exists and its strength is a finite number (the file itself is read before the DiT loads)."""
    for path, strength in loras:
        if not path.is_file():
            raise InputError(f"--lora {path}: no such file")
        if not math.isfinite(strength):
            raise InputError(f"--lora {path}: the strength must be a finite number, got {strength}")


# ---------------------------------------------------------------------------------------------- running a verb

def run_verb(args: argparse.Namespace) -> int:
    """Set up logging (-v), then run the parsed verb with SIGTERM handled and failures mapped to exit statuses."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    with sigterm_raises():
        return dispatch(args)


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


def dispatch(args: argparse.Namespace) -> int:
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
