"""The `make-tiny` verb: `python -m kontext make-tiny OUT_DIR [--seed N]`, tiny random models in the release layouts."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import KontextError
from .common import check_target_folder, os_reason, user_path


def add_parser(sub) -> None:
    p = sub.add_parser("make-tiny", help="write tiny random models in the release layouts (for tests)")
    p.add_argument("out_dir", type=user_path, help="folder to fill like ComfyUI's models/ (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .. import tiny
    from ..params import MAX_SEED, integer

    out_dir: Path = args.out_dir
    integer(args.seed, "--seed", 0, MAX_SEED)
    check_target_folder(out_dir, "make-tiny:")
    try:
        paths = tiny.make_tiny(out_dir, args.seed)
    except OSError as exc:  # a full disk, or a folder made read-only during the run
        raise KontextError(f"make-tiny: cannot write to {out_dir}: {os_reason(exc)}") from None
    for role, path in paths.items():
        print(f"{role:14s} {path}")
    return 0
