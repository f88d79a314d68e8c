"""Attention, with a deliberate choice of kernel.

Backends (all compute full, unmasked attention; RoPE is applied here first, whatever the kernel):
- "sdpa" (the default): PyTorch's scaled_dot_product_attention. On CUDA the cuDNN kernel is tried first, then
  flash, memory-efficient and math (cuDNN measured fastest for Flux's shapes on an H100: 1.44 ms per block call);
- "flash3": FlashAttention-3 (`flash_attn_interface.flash_attn_func`), bf16/fp16 on CUDA, layout [B, N, H, D];
- "sage": SageAttention (`sageattention.sageattn`), bf16/fp16 on CUDA (quantised QK^T: not bit-equal to sdpa);
- "auto": flash3 when it is installed and the GPU is a Hopper (sm_90), else sdpa.

Choose with `set_backend(name)` or the KONTEXT_ATTENTION environment variable (set_backend wins). A backend that
cannot serve a request (not installed, not on CUDA, a float32 input) falls back to sdpa with one warning; which
backend runs is logged once per (request, device, dtype).
"""
from __future__ import annotations

import importlib
import inspect
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .rope import Positions, apply_rope

log = logging.getLogger(__name__)
ENV = "KONTEXT_ATTENTION"
CHOICES = ("auto", "sdpa", "flash3", "sage")
HALF = (torch.bfloat16, torch.float16)
Kernel = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Backend:
    """A kernel: how to import it, when it cannot take an input, and how to call it.

    `run(kernel, q, k, v)` takes q, k, v [B, H, N, D] and returns [B, N, H, D] (the layout the caller flattens)."""

    name: str
    load: Callable[[], Kernel | None]  # the kernel, or None when its package is not importable
    unsupported: Callable[[torch.Tensor], str | None]  # why q cannot use this kernel, or None
    run: Callable[[Kernel, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _import(module: str, name: str) -> Kernel | None:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _cuda_half(q: torch.Tensor) -> str | None:
    if q.device.type != "cuda":
        return f"it runs on CUDA only, the input is on {q.device}"
    if q.dtype not in HALF:
        return f"it takes bf16/fp16, the input is {q.dtype}"
    return None


def _sdpa_backends() -> tuple[list, dict]:
    """The CUDA kernels in our order of preference, and how to make sdpa_kernel keep that order (where this
    PyTorch can: `set_priority` is newer than sdpa_kernel, cuDNN attention newer than the others)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
    order = [getattr(SDPBackend, n) for n in names if hasattr(SDPBackend, n)]
    kw = {"set_priority": True} if "set_priority" in inspect.signature(sdpa_kernel).parameters else {}
    return order, kw


def _load_sdpa() -> Kernel:
    try:
        from torch.nn.attention import sdpa_kernel

        order, kw = _sdpa_backends()
    except ImportError:  # a PyTorch without kernel selection: its own choice on every device
        return F.scaled_dot_product_attention

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not q.is_cuda:
            return F.scaled_dot_product_attention(q, k, v)
        with sdpa_kernel(order, **kw):
            return F.scaled_dot_product_attention(q, k, v)

    return sdpa


def _run_sdpa(kernel: Kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return kernel(q, k, v).transpose(1, 2)


def _run_flash3(kernel: Kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # FlashAttention takes [B, N, H, D]; a transposed view keeps the last dimension contiguous, which is all it needs.
    out = kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out[0] if isinstance(out, tuple) else out  # some releases also return the log-sum-exp


def _run_sage(kernel: Kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return kernel(q, k, v, tensor_layout="HND", is_causal=False).transpose(1, 2)


REGISTRY: dict[str, Backend] = {
    "sdpa": Backend("sdpa", _load_sdpa, lambda q: None, _run_sdpa),
    "flash3": Backend("flash3", lambda: _import("flash_attn_interface", "flash_attn_func"), _cuda_half, _run_flash3),
    "sage": Backend("sage", lambda: _import("sageattention", "sageattn"), _cuda_half, _run_sage),
}
INSTALL = {"flash3": "flash_attn_interface (FlashAttention-3, built from flash-attention's hopper/ folder)",
           "sage": "sageattention"}

_requested: str | None = None
_chosen: dict[tuple, tuple[Backend, Kernel]] = {}  # by (request, device, dtype): resolved once, then a lookup


def set_backend(name: str | None) -> None:
    """Use `name` (one of CHOICES) from now on; None goes back to KONTEXT_ATTENTION, else "auto"."""
    if name is not None and name not in CHOICES:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(CHOICES)}")
    global _requested
    _requested = name
    _chosen.clear()  # a new request is resolved (and logged) afresh


def requested() -> str:
    """The backend asked for: set_backend's, else the environment's, else "auto"."""
    return _requested or os.environ.get(ENV, "").strip().lower() or "auto"


def _is_hopper(q: torch.Tensor) -> bool:
    return q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9


def _resolve(name: str, q: torch.Tensor) -> tuple[Backend, Kernel]:
    sdpa = REGISTRY["sdpa"]
    if name not in CHOICES:
        log.warning("attention: %s=%r is not one of %s; using sdpa", ENV, name, ", ".join(CHOICES))
        return sdpa, sdpa.load()
    if name == "auto":
        kernel = REGISTRY["flash3"].load()
        if kernel is not None and _is_hopper(q) and REGISTRY["flash3"].unsupported(q) is None:
            log.info("attention: flash3 (auto: FlashAttention-3 on a Hopper GPU)")
            return REGISTRY["flash3"], kernel
        log.info("attention: sdpa (auto, on %s, %s)", q.device, q.dtype)
        return sdpa, sdpa.load()
    backend = REGISTRY[name]
    kernel = backend.load()
    why = f"{INSTALL.get(name, name)} is not importable" if kernel is None else backend.unsupported(q)
    if why is not None:
        log.warning("attention: %s was asked for but %s; falling back to sdpa", name, why)
        return sdpa, sdpa.load()
    log.info("attention: %s (on %s, %s)", name, q.device, q.dtype)
    return backend, kernel


def backend_for(q: torch.Tensor) -> str:
    """The name of the backend that runs for inputs like q (resolving, and logging, on first use)."""
    return _choose(q)[0].name


def _choose(q: torch.Tensor) -> tuple[Backend, Kernel]:
    key = (requested(), str(q.device), q.dtype)
    if key not in _chosen:
        _chosen[key] = _resolve(key[0], q)
    return _chosen[key]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: Positions) -> torch.Tensor:
    """q, k, v [B, H, N, D] -> [B, N, H*D], with RoPE on q and k, full (unmasked) attention."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    backend, kernel = _choose(q)
    return backend.run(kernel, q, k, v).flatten(2)  # [B, N, H*D]
