"""The TensorRT path: ONNX export (export.py, qdq.py), engine builds and their sidecars (build.py, engine_info.py),
and a runtime behind the denoiser (runtime.py). Only the runtime and the build need `tensorrt`; the export needs
`onnx` and `onnxscript` (the `tensorrt` extra of the package).

Here, light enough for every caller to import: the backend's declared capabilities, with its own words for what an
engine cannot do, and its registration as the "tensorrt" backend (kontext.backend imports this package on first use
of that name), so the engine, the command line and the nodes check a request the same way without importing it.
"""
from __future__ import annotations

import os

from ..backend import Capabilities, DiTBackend, register
from ..errors import InputError

LORA_REFUSED = ("a TensorRT engine's weights are fixed when it is built: LoRAs cannot be applied to it. Export the "
                "graph with the LoRA merged (`python -m kontext export-onnx --lora FILE[:STRENGTH]`) and build "
                "that, or use the PyTorch backend")
_OWN_MEMORY = ("a TensorRT engine manages its own memory and kernels: drop dit_offload / compile "
               "(--dit-offload, --compile) with the tensorrt backend")

CAPABILITIES = Capabilities(
    lora=False, block_patches=False, offload=False, compile=False, devices=("cuda",),
    refusals={
        "lora": LORA_REFUSED,
        "block_patches": "this model runs as a TensorRT engine, which cannot run ComfyUI's block patches or "
                         "ControlNet residuals; use the PyTorch backend for them",
        "offload": _OWN_MEMORY,
        "compile": _OWN_MEMORY,
        "device": "a TensorRT engine runs on an NVIDIA GPU, not on {device}: use the cuda device, or the torch "
                  "backend",
    })


def check_request(device, loras=(), dit_offload: str = "none", compile: bool = False) -> None:
    """What a run on an engine cannot have, refused before any model loads: a device other than a CUDA GPU,
    LoRAs, DiT offload or compiled blocks."""
    CAPABILITIES.check_request(device, loras, dit_offload, compile)


def load(path: str | os.PathLike, engine: str | os.PathLike | None, precision: str | None) -> DiTBackend:
    """The engine for the DiT file at `path` (which is only hashed, so that an engine built from another model is
    refused as stale): `load_dit(path, backend="tensorrt", engine=...)` lands here."""
    from ..dit_file import stored_precision
    from ..weights import Checkpoint
    from ..weights.checkpoint import resolve_model_path
    from .runtime import load_engine

    if engine is None:
        raise InputError("backend='tensorrt' needs the engine: its .plan file or the folder of engines "
                         "(--engine DIR; `python -m kontext build-engine` makes one)")
    if precision == "auto":
        precision = None
    ckpt = Checkpoint(resolve_model_path(path, "transformer"))
    return load_engine(engine, source=ckpt.path, precision=precision, preferred=stored_precision(ckpt))


register("tensorrt", CAPABILITIES, load)
