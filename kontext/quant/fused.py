"""Activation quantisers compiled once into fused kernels: a per-token amax, scale and cast run as separate ops cost
more than the low-precision matmul saves (measured 15% slower than bf16 on an H100 for fp8)."""
from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)


class Fused:
    """`fn` compiled on its first CUDA call (dynamic in the token count, one graph); eager on the CPU, and for good
    where compiling, or running what was compiled, fails (one warning naming `what`). Out of memory is re-raised:
    a full GPU is not a compiler failure."""

    def __init__(self, fn: Callable, what: str):
        self.fn, self.what = fn, what
        self.compiled: Callable | None = None

    def __call__(self, x: torch.Tensor):
        if not x.is_cuda:
            return self.fn(x)
        if self.compiled is None:
            try:
                self.compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
            except Exception as exc:  # no compiler toolchain: stay correct, say why it is slower
                log.warning("%s runs unfused (%s)", self.what, exc)
                self.compiled = self.fn
        try:
            return self.compiled(x)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            log.warning("%s: the compiled kernels failed, running it unfused (%s)", self.what, exc)
            self.compiled = self.fn
            return self.fn(x)
