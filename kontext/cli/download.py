"""The `download` verb: `python -m kontext download --to MODELS [--fp8] [--token T]`, the release files from the Hub."""
from __future__ import annotations

import argparse

from ..errors import KontextError
from .common import check_target_folder, os_reason, user_path


def add_parser(sub) -> None:
    p = sub.add_parser("download", help="fetch the release files from the Hugging Face Hub into a models/ folder")
    p.add_argument("--to", type=user_path, required=True, help="ComfyUI models/ folder (created if missing)")
    p.add_argument("--fp8", action="store_true", help="the fp8_scaled DiT and T5 (half the size)")
    p.add_argument("--token", default=None, help="Hugging Face token (default: HF_TOKEN / the cached login)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .. import hub

    check_target_folder(args.to, "--to")  # before the first request, not after a 24 GB download
    try:
        files = hub.download(args.to, fp8=args.fp8, token=args.token)
    except OSError as exc:  # the Hub's own failures arrive as KontextErrors; these are the local disk's
        raise KontextError(f"download into {args.to} failed: {os_reason(exc)}") from None
    for role, path in files.items():
        print(f"{role:14s} {path}")
    return 0
