"""Regional compilation of the DiT: each transformer block is compiled, not the whole model.

Every DoubleStreamBlock runs the same code on different weights, as does every SingleStreamBlock. With PyTorch's
default `inline_inbuilt_nn_modules`, parameters are graph inputs, so the first block of a class compiles one graph
and the other blocks of that class reuse it: compile time is that of two blocks, not of 57. The embedders, the
final layer and the Python around the blocks (BlockRunner hooks, offload policies, LoRA branches and ComfyUI's
`weight_function`) stay eager and keep working as they are.

    >>> dit = compile_blocks(load_dit("flux1-kontext-dev.safetensors", device="cuda"))
    >>> dit.compile_warmup_s  # first-call seconds per block class and input shapes, filled as it runs

With `dynamic=True` (the default) the sequence lengths are symbolic, so another resolution or reference count does
not compile again. A compile that fails (no compiler toolchain, an unsupported PyTorch) switches the DiT back to
eager with one warning; the result is the eager one.

A copy of a compiled block (`kontext.lora.apply.with_loras` makes shallow ones) still calls the original block's
compiled code: compile the copy again (`compile_blocks` on the new DiT) after applying LoRAs.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import attention

log = logging.getLogger(__name__)
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class _State:
    """What the blocks of one compiled DiT share: whether it fell back to eager, and the warm-up times."""

    def __init__(self, blocks: list[nn.Module]):
        self.blocks = blocks
        self.eager = False
        self.warmup_s: dict[str, float] = {}

    def to_eager(self, error: BaseException) -> None:
        if not self.eager:
            log.warning("torch.compile failed (%s: %s); the DiT runs eagerly", type(error).__name__, error)
        self.eager = True
        for block in self.blocks:
            block._compiled_call_impl = None  # nn.Module's own switch: back to the plain forward


def _shape_key(block: nn.Module, args: tuple) -> str:
    shapes = ",".join("x".join(map(str, a.shape)) for a in args if isinstance(a, torch.Tensor))
    return f"{type(block).__name__}[{shapes}]"


def _own_storage(args: tuple) -> tuple:
    """Views copied to tensors of their own. Dynamo guards on whether an input is a view (the first block gets
    the embedder's F.linear output, a view; later blocks get sums), so without this the first block of each class
    compiles a second graph. One activation copy per forward costs far less than a block."""
    return tuple(a.clone() if isinstance(a, torch.Tensor) and a._base is not None else a for a in args)


class _Guarded:
    """Stands in for a block's compiled call: times the first call per input shape and falls back to eager."""

    def __init__(self, block: nn.Module, compiled: Callable, state: _State):
        self.block, self.compiled, self.state = block, compiled, state

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.state.eager:
            return self.block._call_impl(*args, **kwargs)
        key = _shape_key(self.block, args)
        start = time.perf_counter() if key not in self.state.warmup_s else None
        try:
            out = self.compiled(*_own_storage(args), **kwargs)
        except Exception as error:  # noqa: BLE001 - any compiler failure; a bad input fails eagerly too
            return self._eager_after(error, args, kwargs)
        if start is not None:
            if any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
                torch.cuda.synchronize()  # the compile is on the host; the first run's kernels are asynchronous
            self.state.warmup_s[key] = time.perf_counter() - start
        return out

    def _eager_after(self, error: Exception, args: tuple, kwargs: dict) -> Any:
        # If the eager forward fails too, the input is at fault, not the compiler: raise that, keep compiling.
        out = self.block._call_impl(*args, **kwargs)
        self.state.to_eager(error)
        return out


def _resolve_mode(mode: str | None, cuda_graphs: bool, device: torch.device) -> str | None:
    if mode not in MODES:
        raise ValueError(f"unknown compile mode {mode!r}; expected one of {MODES}")
    if device.type != "cuda":
        if cuda_graphs or mode not in (None, "default"):
            log.info("compile: CUDA graphs and autotuning are CUDA only; default inductor mode on %s", device)
        return None
    if mode == "max-autotune" and not cuda_graphs:
        return "max-autotune-no-cudagraphs"  # inductor's max-autotune records CUDA graphs unless told not to
    if cuda_graphs and mode in (None, "default"):
        return "reduce-overhead"
    if not cuda_graphs and mode == "reduce-overhead":
        raise ValueError("mode 'reduce-overhead' is CUDA graphs: pass cuda_graphs=True")
    return mode


def _warm_attention(dit: nn.Module, device: torch.device) -> None:
    """Choose (and log) the attention kernel outside the compiled code: the choice imports and logs, which would
    break each block's graph in two on its first trace."""
    head_dim = dit.config.hidden_size // dit.config.num_heads
    attention.backend_for(torch.empty(1, 1, 1, head_dim, device=device, dtype=dit.compute_dtype))


def _block_device(dit: nn.Module) -> torch.device:
    p = next(dit.double_blocks.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def compile_blocks(dit: nn.Module, dynamic: bool = True, mode: str | None = None, cuda_graphs: bool = False,
                   device: torch.device | str | None = None) -> nn.Module:
    """Compile the DiT's double- and single-stream blocks in place (nn.Module.compile) and return the DiT.

    `mode` is torch.compile's; "max-autotune" and `cuda_graphs` (mode "reduce-overhead") apply on CUDA only and
    are ignored elsewhere with an info log. `device` is where the blocks compute (default: where their weights
    are; pass the GPU for a DiT whose blocks are streamed from CPU memory). Sets `dit.compile_warmup_s`."""
    device = torch.device(device) if device is not None else _block_device(dit)
    mode = _resolve_mode(mode, cuda_graphs, device)
    blocks = [*dit.double_blocks, *dit.single_blocks]
    state = _State(blocks)
    dit.compile_warmup_s = state.warmup_s
    try:
        _warm_attention(dit, device)
        for block in blocks:
            block.compile(dynamic=dynamic, mode=mode, fullgraph=False)
            block._compiled_call_impl = _Guarded(block, block._compiled_call_impl, state)
    except Exception as error:  # noqa: BLE001 - torch.compile unavailable here (platform, Python version)
        state.to_eager(error)
    return dit
