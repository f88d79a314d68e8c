"""Streaming the DiT's blocks from CPU memory: FLUX.1 Kontext on GPUs smaller than its weights.

The 19 double and 38 single blocks hold nearly all of the 12B parameters (a bf16 double block is ~0.68 GB, a single
block ~0.28 GB); the other layers (img_in, txt_in, the time/guidance/vector embedders, the final layer) are a few
hundred MB. `prepare(dit, device)` puts those small layers on the GPU for good and the blocks in pinned CPU memory;
`StreamingBlocks`, a `kontext.dit.BlockRunner`, then gives each block a GPU copy of its weights just before it runs:
while block i computes, block i+1's weights are copied on a side CUDA stream, and block i's copy is freed after it
ran. At most about two blocks' weights are on the GPU at a time, so a bf16 Kontext fits a 16 GB card and an fp8 one
an 8 GB card (weights of ~1.4 GB resident, plus activations, the VAE and the text encoders' visits). Those two sizes
are to be checked on a big card with `torch.cuda.set_per_process_memory_fraction`; the speed cost (each step moves
every block over PCIe once, partly hidden behind compute) is to be measured on a GPU too.

    dit = load_dit(path, device="cpu", dtype=torch.bfloat16)
    prepare(dit, "cuda")
    with StreamingBlocks(dit, "cuda") as blocks:
        latent = sample_latent(dit, txt, pooled, ..., device="cuda", blocks=blocks)

The layers bring their weights to the input's device at use (`kontext.ops.CastAtUse`), so a block whose weights were
not fetched (a host calling blocks in another order) still computes correctly, only slower; the runner fetches such a
block on the spot. Weights are only read during inference, so the GPU copy is simply dropped after use, never copied
back. On a machine without CUDA the same bookkeeping runs with CPU copies, which the tests use to check the logic.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Iterator

import torch
from torch import nn

from .dit import BlockRunner, FluxDiT
from .layers import DoubleStreamBlock, SingleStreamBlock
from .rope import Positions

BLOCK_LISTS = ("double_blocks", "single_blocks")


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """The module's parameters and buffers, each once (a tied tensor is fetched once)."""
    seen: set[int] = set()
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            yield t


def _pinned(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    # Pinned pages let the host-to-device copy run asynchronously on the side stream; pageable ones would make
    # every fetch a synchronous copy.
    return t if t.is_pinned() else t.pin_memory()


@torch.no_grad()
def prepare(dit: FluxDiT, device: torch.device | str) -> FluxDiT:
    """Put the non-block layers on `device` and the blocks' weights in CPU memory (pinned when CUDA is there)."""
    device = torch.device(device)
    for name, child in dit.named_children():
        if name not in BLOCK_LISTS:
            child.to(device)
    pin = torch.cuda.is_available()
    for name in BLOCK_LISTS:
        for t in _tensors(getattr(dit, name)):
            t.data = _pinned(t.data) if pin else t.data.cpu()
    return dit


class StreamingBlocks(BlockRunner):
    """Runs each block with a GPU copy of its weights, fetched one block ahead on a side stream (see the module).

    Use one per run, as a context manager (or call `release_all`) so that no GPU copy outlives the run."""

    def __init__(self, dit: FluxDiT, device: torch.device | str):
        self.device = torch.device(device)
        self.order: list[nn.Module] = [*dit.double_blocks, *dit.single_blocks]  # the order forward runs them in
        self._index = {id(b): n for n, b in enumerate(self.order)}
        self.cuda = self.device.type == "cuda"
        self.side = torch.cuda.Stream(self.device) if self.cuda else None
        self._homes: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # by order index: (tensor, home data)
        self._ready: dict[int, torch.cuda.Event] = {}  # by order index: the fetch's copies are done
        self._last_done: torch.cuda.Event | None = None  # the previous block's compute, on the compute stream

    # The BlockRunner interface: the same calls as the plain runner, around a fetched copy.
    def double(self, i: int, block: DoubleStreamBlock, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor,
               pe: Positions) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(block, lambda: block(img, txt, vec, pe))

    def single(self, i: int, block: SingleStreamBlock, x: torch.Tensor, vec: torch.Tensor, pe: Positions,
               n_txt: int) -> torch.Tensor:
        return self._run(block, lambda: block(x, vec, pe))

    def _run(self, block: nn.Module, call):
        n = self._index.get(id(block))
        if n is None:  # not one of this DiT's blocks (a host's replacement): run it as it is
            return call()
        if n not in self._homes:
            self._fetch(n)
        self._wait_ready(n)
        self._prefetch(n + 1)
        try:
            return call()
        finally:
            self._release(n)

    def _prefetch(self, n: int) -> None:
        if n >= len(self.order) or n in self._homes:
            return
        if self.cuda and self._last_done is not None:
            # Bound how far the host runs ahead: without this it would queue fetches of every block before the GPU
            # finished the first ones, and their copies would pile up in GPU memory.
            self._last_done.synchronize()
        self._fetch(n)

    @torch.no_grad()
    def _fetch(self, n: int) -> None:
        """Swap a device copy of block n's tensors in; the home (CPU) tensors are kept to swap back."""
        homes = []
        with torch.cuda.stream(self.side) if self.cuda else nullcontext():
            for t in _tensors(self.order[n]):
                homes.append((t, t.data))
                # copy=True: on the CPU too the block gets its own copy, so the tests see the swap happen.
                t.data = t.data.to(self.device, non_blocking=True, copy=True)
            if self.cuda:
                self._ready[n] = torch.cuda.Event()
                self._ready[n].record(self.side)
        self._homes[n] = homes

    def _wait_ready(self, n: int) -> None:
        ready = self._ready.pop(n, None)
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)  # the copies land before the block reads them

    @torch.no_grad()
    def _release(self, n: int) -> None:
        """Swap block n's home tensors back and drop its device copy."""
        compute = torch.cuda.current_stream(self.device) if self.cuda else None
        for t, home in self._homes.pop(n, ()):
            if compute is not None:
                # Allocated on the side stream, read on the compute stream: without this the allocator could hand
                # the memory to the next fetch while the block is still reading it.
                t.data.record_stream(compute)
            t.data = home
        if compute is not None:
            self._last_done = torch.cuda.Event()
            self._last_done.record(compute)

    def release_all(self) -> None:
        """Put every block's weights back home (after a run, or one stopped midway)."""
        for n in list(self._homes):
            self._wait_ready(n)
            self._release(n)

    def __enter__(self) -> "StreamingBlocks":
        return self

    def __exit__(self, *exc) -> None:
        self.release_all()

