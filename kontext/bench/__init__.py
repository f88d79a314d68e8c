"""The `bench` harness: the DiT timed per precision and memory mode on random weights, against diffusers' and
ComfyUI's Flux in the same process.

A tool beside the engine, not part of it: it imports the engine (and ComfyUI, to compare against it), and no engine
module imports it. `core` builds the models on random weights, the inputs, the timers and the peers; `modes` runs
each row in its memory mode and draws the table.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .core import (PATHS, SIZES, Inputs, Peer, Row, Setup, build, check_paths, check_res, default_dtype, make_inputs,
                   parameter_bytes)
from .modes import MODES, check_cuda_graphs, check_memory_limit, check_modes, render, run_all

__all__ = ["MODES", "PATHS", "SIZES", "Inputs", "Peer", "Row", "Setup", "bench", "build", "check_cuda_graphs",
           "check_memory_limit", "check_modes", "check_paths", "check_res", "default_dtype", "make_inputs",
           "parameter_bytes", "render"]


def bench(s: Setup, paths: list[str], comfy_dir: Path | None = None, size_name: str = "",
          modes: list[str] | None = None, progress: Callable[[dict], None] | None = None) -> dict:
    """The peers, then every path in every mode (MODES, all by default); all the numbers (`render` draws them as a
    table). `progress` gets the result so far after each row (the command line rewrites its JSON with it: a run cut
    short keeps the rows it measured)."""
    return run_all(s, paths, comfy_dir, size_name, modes, progress)
