"""`open_dit`: a DiT checkpoint opened once, with everything the loader, the writer and the tools read off it.

A `DitFile` is the file's header, validated (kontext.weights.Checkpoint), plus what the header says about the DiT:
its layout (BFL or diffusers names) and key prefix, its architecture (`config`), the plan from our parameters to
its tensors, and each linear layer's stored format. Nothing but the header (and the few-byte `comfy_quant`
descriptions) is read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

import torch

from .config import FluxConfig
from .dit import FluxDiT
from .errors import CheckpointError
from .flux_keys import bfl_plan, config_from_shapes, detect, diffusers_plan
from .formats import StoredQuant, narrowest
from .precision import DENSE, dense_name
from .weights import Checkpoint, Plan
from .weights.checkpoint import resolve_model_path
from .weights.identify import describe


@dataclass(frozen=True)
class DitFile:
    ckpt: Checkpoint
    layout: str  # "bfl" | "diffusers"
    prefix: str  # the DiT's key prefix in an all-in-one file ("" for a DiT alone)
    config: FluxConfig

    @property
    def path(self):
        return self.ckpt.path

    def meta_model(self, dtype: torch.dtype | None = None) -> FluxDiT:
        """The DiT for this file's config, built on the `meta` device (nothing is allocated)."""
        with torch.device("meta"):
            return FluxDiT(self.config) if dtype is None else FluxDiT(self.config, dtype=dtype)

    @cached_property
    def plan(self) -> Plan:
        """Our parameter name -> where it comes from in the file (the key plan of its layout)."""
        if self.layout == "bfl":
            return bfl_plan([n for n, _ in self.meta_model().named_parameters()], self.prefix)
        return diffusers_plan(self.config, self.prefix)

    def check_unused(self) -> None:
        """Refuse a file holding tensors under the DiT's prefix that no parameter takes (a different or modified
        model). With a prefix (an all-in-one checkpoint), tensors outside it belong to other models."""
        used = {k for src in self.plan.values() for k in src.keys}
        unused = {k for k in self.ckpt.weight_keys() if k.startswith(self.prefix)} - used
        if unused:
            raise CheckpointError(self.path, f"holds {len(unused)} tensors a Flux DiT does not have "
                                             f"(e.g. {sorted(unused)[0]!r}): a different or modified model?")

    def stored(self, layer: str) -> StoredQuant | None:
        """How linear layer `layer` (our name) is stored when quantised; None for a dense (or joined) weight."""
        src = self.plan.get(f"{layer}.weight")
        return self.ckpt.quantized.get(src.keys[0]) if src is not None and src.op == "copy" else None

    @property
    def precision(self) -> str:
        return stored_precision(self.ckpt)


def stored_precision(ckpt: Checkpoint) -> str:
    """The precision a file stores its DiT in: the narrowest quantised format when any layer is quantised, else its
    weights' dtype."""
    fmt = narrowest({q.format for q in ckpt.quantized.values()})
    if fmt is not None:
        return fmt.name
    dtypes = {ckpt.dtype(k) for k in ckpt.weight_keys() if k.endswith(".weight")}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.bfloat16  # a mixed file: name it by the GPU default
    return dense_name(dtype) if dtype in DENSE.values() else "bf16"


def open_dit(path: "str | os.PathLike | Checkpoint | DitFile") -> DitFile:
    """The DiT checkpoint at `path` (a file, a folder of shards, a diffusers repository root, or a Checkpoint or
    DitFile open already), its layout, prefix and config read off the header; CheckpointError for anything but a
    Flux DiT."""
    if isinstance(path, DitFile):
        return path
    ckpt = path if isinstance(path, Checkpoint) else Checkpoint(resolve_model_path(path, "transformer"))
    found = detect(ckpt.weight_keys())
    if found is None:
        raise CheckpointError(ckpt.path, f"is not a Flux DiT checkpoint: it looks like {describe(ckpt.weight_keys())}",
                              "a FLUX.1 Kontext diffusion model (BFL, ComfyUI fp8_scaled or diffusers layout)")
    layout, prefix = found
    return DitFile(ckpt, layout, prefix, config_from_shapes(ckpt, layout, prefix))
