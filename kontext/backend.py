"""DiT backends: what "something that predicts velocity for packed tokens" offers, and what each one can do.

A backend is any object with the `DiTBackend` shape: the model's `config`, its `compute_dtype`, `positions(txt_ids,
img_ids)` (whatever it needs per run to place the tokens, built once and handed back at every step) and
`token_forward(img, txt, timesteps, y, guidance, pe, blocks)`. The PyTorch DiT (kontext.dit.FluxDiT) is one; a
TensorRT engine (kontext.tensorrt.runtime.EngineDiT) is another. The Denoiser, the pipeline and the nodes use only
this shape.

What a backend can do is declared, not discovered: its `Capabilities` say whether it takes LoRAs, block patches
(ComfyUI's patches_replace and ControlNet residuals, any non-plain kontext.dit.BlockRunner), DiT offload, torch.compile,
and, for later, step caching and sequence parallelism. A caller asks `require(feature)`, which refuses in the
backend's own words, so no caller needs to know which backend it holds.

Backends are registered by name (`register`), so that `load_dit(..., backend=NAME)` reaches them without the engine
importing them: an optional backend is known here only by its module path (`OPTIONAL`), imported on first use, and
registers itself on import.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Protocol, Sequence, TypeVar

import torch

from .errors import InputError

if TYPE_CHECKING:
    import os

    from .config import FluxConfig
    from .dit import BlockRunner

FEATURES = ("lora", "block_patches", "offload", "compile", "step_cache", "sequence_parallel")


@dataclass(frozen=True)
class Capabilities:
    """What a backend supports, and its words for what it does not (`refusals`, by feature; "device" may use
    {device}). `devices`: the device types it runs on (empty: any)."""
    lora: bool = True
    block_patches: bool = True
    offload: bool = True
    compile: bool = True
    step_cache: bool = False
    sequence_parallel: bool = False
    devices: tuple[str, ...] = ()
    refusals: Mapping[str, str] = field(default_factory=dict)

    def supports(self, feature: str) -> bool:
        if feature not in FEATURES:
            raise ValueError(f"unknown backend feature {feature!r}; expected one of {', '.join(FEATURES)}")
        return bool(getattr(self, feature))

    def require(self, feature: str) -> None:
        """Raise the backend's explanation (InputError) when it cannot do `feature`."""
        if not self.supports(feature):
            raise InputError(self.refusals.get(feature, f"this backend does not support {feature}"))

    def check_device(self, device: torch.device | str | None) -> None:
        kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
        if device is not None and self.devices and kind not in self.devices:
            words = self.refusals.get("device", "this backend does not run on {device}")
            raise InputError(words.format(device=device))

    def check_request(self, device: torch.device | str | None = None, loras: Sequence = (),
                      dit_offload: str = "none", compile: bool = False) -> None:
        """A run's request, refused before any model loads when it asks for what this backend cannot do."""
        self.check_device(device)
        if loras:
            self.require("lora")
        if dit_offload != "none":
            self.require("offload")
        if compile:
            self.require("compile")


P = TypeVar("P")  # a backend's per-run positions: kontext.rope.Positions, or an engine's token ids


class DiTBackend(Protocol[P]):
    """Something that predicts velocity for packed tokens (see the module docstring)."""

    capabilities: Capabilities  # declared by the backend's class
    config: FluxConfig
    compute_dtype: torch.dtype

    def positions(self, txt_ids: torch.Tensor, img_ids: torch.Tensor) -> P:
        """What the token forward needs to place text then image tokens (ids [1, L, 3], [1, N, 3]); once a run."""
        ...

    def token_forward(self, img: torch.Tensor, txt: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor,
                      guidance: torch.Tensor | None, pe: P, blocks: BlockRunner) -> torch.Tensor:
        """img [B, N, 64] packed tokens, txt [B, L, ctx], timesteps [B], y [B, vec], guidance [B] -> the velocity
        [B, N, 64] of every image token. `blocks` runs the blocks; only a backend with block_patches honours a
        non-plain one (the Denoiser refuses it for the others)."""
        ...


# (path of the DiT file, engine or other location, precision) -> the backend's model
Loader = Callable[["str | os.PathLike", "str | os.PathLike | None", "str | None"], DiTBackend]


@dataclass(frozen=True)
class Registered:
    name: str
    capabilities: Capabilities
    load: Loader | None  # None: the built-in PyTorch DiT, which load_dit itself loads


BUILT_IN = "torch"
OPTIONAL = {"tensorrt": "kontext.tensorrt"}  # name -> the module that registers it when imported
_registry: dict[str, Registered] = {}


def register(name: str, capabilities: Capabilities, load: Loader | None) -> None:
    _registry[name] = Registered(name, capabilities, load)


def names() -> tuple[str, ...]:
    return tuple(dict.fromkeys((BUILT_IN, *_registry, *OPTIONAL)))


def named(name: str) -> Registered:
    """The backend registered as `name`, importing an optional one on first use."""
    if name not in _registry and name in OPTIONAL:
        importlib.import_module(OPTIONAL[name])
    if name == BUILT_IN and name not in _registry:
        importlib.import_module("kontext.dit")
    if name not in _registry:
        raise InputError(f"unknown backend {name!r}; expected one of {', '.join(names())}")
    return _registry[name]
