"""One validated set of sampling parameters, shared by the library, the command line and the nodes.

Each rule is written once, here; each interface checks its inputs with it *before* any file is opened or model
loaded, and the message speaks that interface's vocabulary: argument names in the library (`num_images`), flags on the
command line (`--num-images`), input names in ComfyUI (`batch`).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, fields, replace

from .errors import InputError
from .ids import METHODS

MAX_STEPS = 1000
MAX_GUIDANCE = 100.0
MAX_TRUE_CFG = 100.0
MAX_IMAGES = 64
MAX_SEED = 2**64 - 1  # ComfyUI's seed widget range; torch.Generator takes any of these
MULTIPLE = 16  # output sides: 8x VAE downsampling times the DiT's 2x2 patches
MIN_SIDE, MAX_SIDE = 64, 4096  # sane output range per side (smaller is a typo more often than a wish)

# Field -> the name a user of each interface typed.
LIBRARY = {f: f for f in ("steps", "guidance", "true_cfg", "denoise", "seed", "reference_method", "width", "height")}
LIBRARY["num_images"] = "num_images"
CLI = {f: "--" + f.replace("_", "-") for f in LIBRARY}
NODE = {**LIBRARY, "num_images": "batch (the latent's batch size)"}


@dataclass(frozen=True)
class SamplingParams:
    """What one edit asks for. `validated(names)` checks every field and returns a normalised copy."""

    steps: int = 28
    guidance: float = 2.5  # embedded guidance (Kontext's default)
    true_cfg: float = 1.0  # > 1 runs a second pass on the negative prompt
    denoise: float = 1.0  # < 1: image-to-image, the last ceil(steps * denoise) steps
    seed: int = 0
    num_images: int = 1
    reference_method: str = "offset"
    width: int | None = None  # None: from the first reference (floored to 16, within MIN_SIDE..MAX_SIDE)
    height: int | None = None

    def validated(self, names: dict[str, str] = LIBRARY) -> "SamplingParams":
        out = {}
        for f in fields(self):
            out[f.name] = CHECKS[f.name](getattr(self, f.name), names.get(f.name, f.name))
        return replace(self, **out)

    @property
    def true_cfg_on(self) -> bool:
        return self.true_cfg > 1.0


def integer(value: object, name: str, low: int, high: int) -> int:
    """An int in [low, high]; numpy and torch integers and whole floats (1024.0, from JSON) pass, bools do not."""
    try:
        if isinstance(value, bool):
            raise TypeError
        n = int(value) if isinstance(value, float) and value.is_integer() else operator.index(value)
    except TypeError:
        raise InputError(f"{name} must be a whole number, got {value!r}") from None
    if not low <= n <= high:
        raise InputError(f"{name} must be between {low} and {high}, got {n}")
    return n


def number(value: object, name: str, low: float, high: float, low_open: bool = False) -> float:
    """A finite float in [low, high] (or (low, high] with low_open); nan and inf are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise InputError(f"{name} must be a number, got {value!r}")
    x = float(value)
    if not math.isfinite(x) or x > high or x < low or (low_open and x == low):
        span = f"above {low:g} and at most {high:g}" if low_open else f"between {low:g} and {high:g}"
        raise InputError(f"{name} must be {span}, got {value!r}")
    return x


def _method(value: object, name: str) -> str:
    if value not in METHODS:
        raise InputError(f"{name} must be one of {', '.join(METHODS)}, got {value!r}")
    return str(value)


def side(value: object, name: str) -> int:
    """An output side in pixels, floored to a multiple of 16 (as diffusers and BFL do), within MIN_SIDE..MAX_SIDE."""
    n = integer(value, name, 1, 1 << 30)
    floored = n // MULTIPLE * MULTIPLE
    if not MIN_SIDE <= floored <= MAX_SIDE:
        how = "" if n == floored else f" (floored to a multiple of {MULTIPLE}: {floored})"
        raise InputError(f"{name} {n}{how} is outside the supported {MIN_SIDE}..{MAX_SIDE}")
    return floored


def _side(value: object, name: str) -> int | None:
    return None if value is None else (side(value, name), int(value))[1]


CHECKS = {
    "steps": lambda v, n: integer(v, n, 1, MAX_STEPS),
    "guidance": lambda v, n: number(v, n, 0.0, MAX_GUIDANCE),
    "true_cfg": lambda v, n: number(v, n, 0.0, MAX_TRUE_CFG),
    "denoise": lambda v, n: number(v, n, 0.0, 1.0, low_open=True),
    "seed": lambda v, n: integer(v, n, 0, MAX_SEED),
    "num_images": lambda v, n: integer(v, n, 1, MAX_IMAGES),
    "reference_method": _method,
    "width": _side,
    "height": _side,
}
