"""What every linear layer of the DiT shares, whatever its weight format: casting at use, run-time weight functions
and low-rank LoRA branches, and a once-per-run log of the compute path a format takes."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .base import WeightFormat

log = logging.getLogger("kontext.ops")


class CastAtUse:
    """Layers whose weights may live elsewhere than their input (offloaded, streamed by a memory manager): each call
    brings the weight to the input's device and dtype (a no-op when it is there already) and applies the functions
    a host registered on it, such as a LoRA delta computed at run time.

    The attribute names are those of ComfyUI's memory manager (ModelPatcher), the host that drives this protocol:
    it offloads layers that have `comfy_cast_weights` and fills `weight_function` / `bias_function`."""

    comfy_cast_weights = False
    lora_branch = None  # a kontext.lora.apply.Branch: low-rank LoRAs added to the output (see add_branch)
    format: "WeightFormat"  # the weight format this layer class stores (set by the format's module)

    @property
    def fmt(self) -> str:
        """The format's name, for logs and messages."""
        return self.format.name

    def _init_cast(self) -> None:
        self.weight_function: list = []
        self.bias_function: list = []

    def cast_weight(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # A copy when functions follow: they may work in place, and must never change the stored weight.
        w = w.to(device=x.device, dtype=x.dtype, non_blocking=True, copy=bool(self.weight_function))
        for f in self.weight_function:
            w = f(w)
        return w

    def add_branch(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out + up @ (down @ x) for the layer's low-rank LoRAs, in the input's dtype (rank R: ~R/K of the cost)."""
        b = self.lora_branch
        if b is None:
            return out
        down, up = b.down.to(x.device, x.dtype), b.up.to(x.device, x.dtype)
        return out + F.linear(F.linear(x, down), up)

    def cast_bias(self, b: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        if b is None:
            return None
        b = b.to(device=x.device, dtype=x.dtype, non_blocking=True, copy=bool(self.bias_function))
        for f in self.bias_function:
            b = f(b)
        return b


_logged: set[tuple[str, str]] = set()


def log_path(fmt: str, path: str, why: str, fallback: bool = False) -> None:
    """Say once per run which compute path a weight format takes (and why), not once per layer and call; a GPU
    that cannot serve the fast path is a warning, never silent."""
    if (fmt, path) not in _logged:
        _logged.add((fmt, path))
        (log.warning if fallback else log.info)("%s linear layers: %s (%s)", fmt, path, why)
