"""The TensorRT path: ONNX export (export.py, qdq.py), engine builds and their sidecars (build.py, engine_info.py),
and a runtime behind the denoiser (runtime.py). Only the runtime and the build need `tensorrt`; the export needs
`onnx` and `onnxscript` (the `tensorrt` extra of the package).

Here, light enough for every caller to import: what an engine cannot do, checked once for the library, the
command line and the nodes.
"""
from __future__ import annotations

from ..errors import InputError

LORA_REFUSED = ("a TensorRT engine's weights are fixed when it is built: LoRAs cannot be applied to it. Export the "
                "graph with the LoRA merged (`python -m kontext export-onnx --lora FILE[:STRENGTH]`) and build "
                "that, or use the PyTorch backend")


def is_engine(dit) -> bool:
    """A DiT that is a TensorRT engine (kontext.tensorrt.runtime.EngineDiT), without importing tensorrt."""
    return getattr(dit, "backend", "torch") == "tensorrt"


def refuse_loras(dit) -> None:
    """An engine takes no LoRA: raise the explanation (a no-op for a PyTorch DiT)."""
    if is_engine(dit):
        raise InputError(LORA_REFUSED)


def check_request(device, loras=(), dit_offload: str = "none", compile: bool = False) -> None:
    """What a run on an engine cannot have, refused before any model loads: a device other than a CUDA GPU,
    LoRAs, DiT offload or compiled blocks."""
    if device is not None and not str(device).startswith("cuda"):
        raise InputError(f"a TensorRT engine runs on an NVIDIA GPU, not on {device}: use the cuda device, or the "
                         "torch backend")
    if loras:
        raise InputError(LORA_REFUSED)
    if dit_offload != "none" or compile:
        raise InputError("a TensorRT engine manages its own memory and kernels: drop dit_offload / compile "
                         "(--dit-offload, --compile) with the tensorrt backend")
