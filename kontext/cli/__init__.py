"""Command line: `python -m kontext VERB ...` (edit, make-tiny, download, queue, quantize, bench, export-onnx,
build-engine).

One module per verb in this package, each with `add_parser(subparsers)` and `run(args) -> int`; `common` holds what
they share (paths, output checks, LoRA specs, the exit statuses). Adding a verb is one module and one line in VERBS.
Importing a verb module must stay cheap (no torch): `--version` and `--help` build every parser.
"""
from __future__ import annotations

import argparse

from .. import __version__
from . import bench, build_engine, download, edit, export_onnx, make_tiny, quantize, queue
from .common import dispatch, run_verb

__all__ = ["build_parser", "dispatch", "main"]

VERBS = (edit, make_tiny, download, queue, quantize, bench, export_onnx, build_engine)  # the order --help lists


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kontext", description=__doc__.split("\n\n")[0],
                                     epilog="exit status: 0 done, 2 a mistake to fix (see the error line), 3 out of "
                                            "memory, 130 interrupted, 143 terminated, 1 a bug")
    parser.add_argument("--version", action="version", version=f"kontext {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True)
    for verb in VERBS:
        verb.add_parser(sub)
    for p in sub.choices.values():  # accepted after any verb
        p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), run the verb, and return its exit status (see kontext.cli.common)."""
    return run_verb(build_parser().parse_args(argv))
