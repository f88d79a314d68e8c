"""Streaming a checkpoint into a model built on the `meta` device, with every key and shape checked first.

A model class is built on `meta` (no memory), a *plan* says where each of its parameters comes from in the file,
the plan is checked against the file's header (so a wrong file fails before any data is read), and only then are the
tensors read one by one, converted and moved to the target device. A failure never returns a partial model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import CheckpointError, InputError
from ..formats import WeightFormat
from .checkpoint import Checkpoint


@dataclass(frozen=True)
class Source:
    """Where one model parameter comes from: one tensor, a concatenation along dim 0, halves swapped, a linear
    weight reshaped to a 1x1 convolution's; or, for quantised layers, a tensor exactly as stored ("raw"), its scale
    as a scalar or one per row ("scale"), or a unit scale the file leaves implicit ("unit", no keys)."""

    keys: tuple[str, ...]
    op: str = "copy"  # "copy" | "cat" | "swap_halves" | "as_conv1x1" | "raw" | "scale" | "unit"
    # Quantise on load: (format, parameter), e.g. (FP8, "weight_scale"); the parameters of one weight share one
    # quantisation (see LoadQuantizer).
    quant: tuple[WeightFormat, str] | None = None

    @staticmethod
    def of(key: str) -> "Source":
        return Source((key,))


Plan = dict[str, Source]


def source_shape(ckpt: Checkpoint, src: Source) -> tuple[int, ...]:
    if src.quant is not None:
        fmt, leaf = src.quant
        n, k = source_shape(ckpt, Source(src.keys, src.op))
        return fmt.params(n, k)[leaf][0]
    if src.op == "unit":
        return ()
    if src.op == "raw":
        return ckpt.stored_shape(src.keys[0])
    shapes = [ckpt.shape(k) for k in src.keys]
    if src.op == "scale":
        n = math.prod(shapes[0])
        return () if n == 1 else (n,)
    if src.op == "cat":
        if len({s[1:] for s in shapes}) != 1:
            raise CheckpointError(ckpt.path, f"tensors {list(src.keys)} cannot be joined: shapes {shapes}")
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    if src.op == "as_conv1x1" and len(shapes[0]) == 2:
        return (*shapes[0], 1, 1)
    return shapes[0]


class LoadQuantizer:
    """Weights quantised on load, for one load (or one file written): each weight is read and quantised once for all
    its parameters, which are consecutive in a plan; a parameter is handed out once, so at most one layer's tensors
    are held."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self._of: tuple[Source, WeightFormat] | None = None
        self._parts: dict[str, torch.Tensor] = {}

    def part(self, src: Source) -> torch.Tensor:
        assert src.quant is not None
        base, (fmt, leaf) = Source(src.keys, src.op), src.quant
        if self._of != (base, fmt) or leaf not in self._parts:
            self._parts = fmt.quantize(build_tensor(self.ckpt, base).float())
            self._of = (base, fmt)
        return self._parts.pop(leaf)


def build_tensor(ckpt: Checkpoint, src: Source, quantizer: LoadQuantizer | None = None) -> torch.Tensor:
    """The tensor `src` describes; a part of a weight quantised on load comes from `quantizer` (the load's own,
    which quantises each weight once for all its parts)."""
    if src.quant is not None:
        return (quantizer or LoadQuantizer(ckpt)).part(src)
    if src.op == "unit":
        return torch.ones(())
    if src.op == "raw":
        return ckpt.raw(src.keys[0])
    if src.op == "scale":
        t = ckpt.raw(src.keys[0]).float()
        return t.reshape(()) if t.numel() == 1 else t.reshape(-1)
    if src.op == "cat":
        return torch.cat([ckpt.read(k) for k in src.keys], dim=0)
    t = ckpt.read(src.keys[0])
    if src.op == "swap_halves":  # diffusers' AdaLayerNormContinuous stores (scale, shift); BFL stores (shift, scale)
        a, b = t.chunk(2, dim=0)
        t = torch.cat([b, a], dim=0)
    if src.op == "as_conv1x1" and t.dim() == 2:  # diffusers stores 1x1 convs as nn.Linear: [C_out, C_in] -> [.., 1, 1]
        t = t.reshape(*t.shape, 1, 1)
    return t


def check_plan(model: nn.Module, plan: Plan, ckpt: Checkpoint, what: str) -> None:
    """Every parameter has a source of the right shape, from the header alone."""
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in plan or any(k not in ckpt for k in plan[n].keys)]
    if missing:
        found = ", ".join(ckpt.weight_keys()[:4])
        raise CheckpointError(ckpt.path, f"is not a {what} checkpoint: {len(missing)} of its {len(params)} tensors "
                                         f"are missing (first: {missing[0]!r}); the file holds {found}, ...",
                              f"a {what} checkpoint")
    for name, p in params.items():
        if plan[name].op == "raw":  # quantised values as stored (NVFP4 packs them into uint8): shape check only
            if tuple(source_shape(ckpt, plan[name])) != tuple(p.shape):
                raise CheckpointError(ckpt.path, f"tensor for '{name}' has shape "
                                                 f"{list(source_shape(ckpt, plan[name]))}", f"{list(p.shape)}")
            continue
        stored = [ckpt.dtype(k) for k in plan[name].keys]
        bad = next((d for d in stored if not d.is_floating_point), None)
        if bad is not None:
            raise CheckpointError(ckpt.path, f"tensor for '{name}' is stored as {bad}", "floating-point weights")
        shape = source_shape(ckpt, plan[name])
        if tuple(shape) != tuple(p.shape):
            raise CheckpointError(ckpt.path, f"tensor for '{name}' has shape {list(shape)}", f"{list(p.shape)}")


def load_plan(model: nn.Module, plan: Plan, ckpt: Checkpoint, *, what: str, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32, keep_fp32: Callable[[str], bool] | None = None) -> nn.Module:
    """Materialise a meta-device `model` from `ckpt` following `plan`, one tensor at a time."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
        raise InputError(f"cannot compute in {dtype!r}: expected torch.float32, torch.float16 or torch.bfloat16")
    device = as_device(device)
    check_plan(model, plan, ckpt, what)
    quantizer = LoadQuantizer(ckpt)
    for name, _ in list(model.named_parameters()):
        src = plan[name]
        t = build_tensor(ckpt, src, quantizer)
        if src.op == "raw" or src.quant is not None:  # quantised values stay exactly as stored or made
            target = t.dtype
        elif src.op in ("scale", "unit") or (keep_fp32 is not None and keep_fp32(name)):
            target = torch.float32
        else:
            target = dtype
        set_parameter(model, name, t.to(device=device, dtype=target))
    for name, buf in model.named_buffers():
        if buf.is_meta:  # models compute derived tables on the fly; a meta buffer here is a bug, not user error
            raise RuntimeError(f"{type(model).__name__} has an unloaded buffer {name}")
    return model.eval().requires_grad_(False)


def set_parameter(model: nn.Module, name: str, t: torch.Tensor) -> None:
    """Parameter `name` (dotted) of `model` becomes `t`, replacing whatever stood there (a meta placeholder)."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    module._parameters[leaf] = nn.Parameter(t, requires_grad=False)


def as_device(device: torch.device | str) -> torch.device:
    """A torch.device that exists on this machine, or an InputError saying why not."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise InputError(f"device {device!r} is not available on this machine "
                         f"({torch.cuda.device_count()} CUDA device(s) visible)")
    return dev
