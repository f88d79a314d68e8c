"""Regional compilation (kontext.compile): compiled blocks give the eager velocity, compile once per block class
for every sequence length, and fall back to eager when the compiler fails."""
from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.utils import counters

import kontext
from kontext.compile import _resolve_mode, compile_blocks
from kontext.denoiser import Denoiser

# (latent h, w), reference latent sizes: two token counts, one and two references.
CASES = [((4, 4), [(4, 4)]), ((6, 4), [(4, 4), (2, 6)])]


def velocity(dit, size: tuple[int, int], refs: list[tuple[int, int]], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ref_latents = [torch.randn(1, 16, *r, generator=g) for r in refs]
    z = torch.randn(1, 16, *size, generator=g)
    txt, pooled = torch.randn(1, 5, 64, generator=g), torch.randn(1, 64, generator=g)
    with torch.no_grad():
        return Denoiser(dit, size, ref_latents)(z, 0.6, txt, pooled, 2.5)


def graphs() -> int:
    """Graphs dynamo has compiled in this process: a recompile (another block, another shape) adds one."""
    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
def test_compiled_blocks_match_eager_and_compile_once(tiny_models):
    eager = kontext.load_dit(tiny_models["dit"])
    dit = compile_blocks(kontext.load_dit(tiny_models["dit"]), dynamic=True)
    torch._dynamo.reset()  # a clean cache, so the count below is this DiT's alone
    before = graphs()
    for n, (size, refs) in enumerate(CASES):
        torch.testing.assert_close(velocity(dit, size, refs), velocity(eager, size, refs), atol=1e-5, rtol=1e-5)
        # Two graphs, one per block class: the second block of a class and the second size reuse them.
        assert graphs() - before == 2, f"case {n}: {graphs() - before} graphs compiled"
    assert len(dit.compile_warmup_s) == 4  # two block classes x two shapes
    assert all(s >= 0 for s in dit.compile_warmup_s.values())


def _raising_compile(fn, **kwargs):
    def compiled(*args, **kw):
        raise RuntimeError("no C++ compiler")

    return compiled


def _unavailable(fn, **kwargs):
    raise RuntimeError("torch.compile is not supported on this Python")


@pytest.mark.parametrize("fake", [_raising_compile, _unavailable], ids=["fails-at-first-call", "unavailable"])
def test_compile_failure_falls_back_to_eager(tiny_models, monkeypatch, caplog, fake):
    eager = kontext.load_dit(tiny_models["dit"])
    monkeypatch.setattr(torch, "compile", fake)
    with caplog.at_level(logging.WARNING, logger="kontext.compile"):
        dit = compile_blocks(kontext.load_dit(tiny_models["dit"]))
        for size, refs in CASES:
            torch.testing.assert_close(velocity(dit, size, refs), velocity(eager, size, refs), atol=0, rtol=0)
    warnings = [r for r in caplog.records if r.name == "kontext.compile" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "eager" in warnings[0].getMessage()
    assert all(b._compiled_call_impl is None for b in [*dit.double_blocks, *dit.single_blocks])


def test_bad_input_is_raised_not_blamed_on_the_compiler(tiny_models, monkeypatch):
    monkeypatch.setattr(torch, "compile", _raising_compile)
    dit = compile_blocks(kontext.load_dit(tiny_models["dit"]))
    block = dit.single_blocks[0]
    with pytest.raises(RuntimeError, match="shape|size"):
        block(torch.zeros(1, 3, 7), torch.zeros(1, 7), None)  # the eager error, not "no C++ compiler"
    assert block._compiled_call_impl is not None  # still compiled: the compiler was not at fault


def test_modes_cuda_only_features():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _resolve_mode("max-autotune", True, cpu) is None  # ignored on the CPU, with an info log
    assert _resolve_mode(None, True, cuda) == "reduce-overhead"
    assert _resolve_mode("max-autotune", False, cuda) == "max-autotune-no-cudagraphs"
    assert _resolve_mode("max-autotune", True, cuda) == "max-autotune"
    with pytest.raises(ValueError):
        _resolve_mode("fastest", False, cpu)
