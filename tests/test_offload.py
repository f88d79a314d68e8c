"""Streaming the DiT's blocks (kontext.offload): the bookkeeping on the CPU; its GPU speed and memory are measured
on a GPU."""
from __future__ import annotations

import pytest
import torch

import kontext
from kontext.dit import PLAIN, BlockRunner
from kontext.errors import InputError
from kontext.offload import StreamingBlocks, prepare
from kontext.tiny.dit import tiny_dit_state


@pytest.fixture(scope="module")
def dit() -> kontext.FluxDiT:
    config = kontext.FluxConfig.tiny()
    model = kontext.FluxDiT(config, dtype=torch.float32)
    model.load_state_dict({k: v.float() for k, v in tiny_dit_state(config).items()})
    return model.eval()


def inputs(dit: kontext.FluxDiT, B: int = 2, N: int = 16, L: int = 8):
    g = torch.Generator().manual_seed(1)
    c = dit.config
    img_ids = torch.zeros(B, N, 3)
    img_ids[..., 1] = torch.arange(N).div(4, rounding_mode="floor")
    img_ids[..., 2] = torch.arange(N) % 4
    return dict(img=torch.randn(B, N, c.in_channels, generator=g), img_ids=img_ids,
                txt=torch.randn(B, L, c.context_in_dim, generator=g), txt_ids=torch.zeros(B, L, 3),
                timesteps=torch.full((B,), 0.7), y=torch.randn(B, c.vec_in_dim, generator=g),
                guidance=torch.full((B,), 2.5))


def homes(dit: kontext.FluxDiT) -> dict[str, int]:
    return {n: p.data_ptr() for n, p in dit.named_parameters() if "blocks" in n}


def record_runs(dit: kontext.FluxDiT, home: dict[str, int]):
    """Hooks noting each block call, and whether its weights were then fetched copies (not the home tensors)."""
    runs, handles = [], []
    for kind in ("double_blocks", "single_blocks"):
        for i, block in enumerate(getattr(dit, kind)):
            def hook(module, args, kind=kind, i=i):
                swapped = all(p.data_ptr() != home[f"{kind}.{i}.{n}"] for n, p in module.named_parameters())
                runs.append((kind, i, swapped))
            handles.append(block.register_forward_pre_hook(hook))
    return runs, handles


@torch.no_grad()
def test_blocks_run_once_in_order_on_fetched_copies_and_go_back_home(dit):
    x = inputs(dit)
    plain = dit(**x)
    home = homes(dit)
    runs, handles = record_runs(dit, home)
    try:
        with StreamingBlocks(dit, "cpu") as blocks:
            streamed = dit(**x, blocks=blocks)
    finally:
        for h in handles:
            h.remove()
    c = dit.config
    expected = [("double_blocks", i, True) for i in range(c.depth)] + \
               [("single_blocks", i, True) for i in range(c.depth_single_blocks)]
    assert runs == expected
    assert (streamed - plain).abs().max() <= 1e-6
    assert homes(dit) == home and all(p.device.type == "cpu" for p in dit.parameters())


@torch.no_grad()
def test_prefetch_keeps_at_most_two_blocks_fetched(dit):
    fetched = []

    class Spy(StreamingBlocks):
        def _run(self, block, call):
            out = super()._run(block, call)
            fetched.append(len(self._homes))
            return out

    with Spy(dit, "cpu") as blocks:
        dit(**inputs(dit), blocks=blocks)
    n = dit.config.depth + dit.config.depth_single_blocks
    assert fetched == [1] * (n - 1) + [0]  # after each block: only the next one's copy; none after the last


@torch.no_grad()
def test_stopped_run_puts_every_block_back(dit):
    home = homes(dit)

    class Boom(StreamingBlocks):
        def single(self, i, block, *args):
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        with Boom(dit, "cpu") as blocks:
            dit(**inputs(dit), blocks=blocks)
    assert homes(dit) == home and not blocks._homes


@torch.no_grad()
def test_a_host_block_not_in_the_model_runs_as_it_is(dit):
    x = inputs(dit)
    plain = dit(**x)

    class Swapped(StreamingBlocks):
        def double(self, i, block, *args):
            if i == 0:  # a host's copy of block 0: not one of the model's modules
                import copy

                return super().double(i, copy.deepcopy(block), *args)
            return super().double(i, block, *args)

    with Swapped(dit, "cpu") as blocks:
        assert (dit(**x, blocks=blocks) - plain).abs().max() <= 1e-6


def test_prepare_keeps_small_layers_on_the_device_and_blocks_on_the_cpu(dit):
    prepare(dit, "cpu")
    assert all(p.device.type == "cpu" for p in dit.parameters())
    assert isinstance(StreamingBlocks(dit, "cpu"), BlockRunner)


@torch.no_grad()
def test_sample_latent_passes_the_runner_to_every_step(dit, monkeypatch):
    from kontext.pipeline import sample_latent

    calls = []

    class Counting(BlockRunner):
        def double(self, i, block, *args):
            calls.append(i)
            return super().double(i, block, *args)

    txt, pooled = torch.randn(1, 8, dit.config.context_in_dim), torch.randn(1, dit.config.vec_in_dim)
    kw = dict(width=32, height=32, steps=2, seed=3)
    plain = sample_latent(dit, txt, pooled, **kw)
    counted = sample_latent(dit, txt, pooled, blocks=Counting(), **kw)
    with StreamingBlocks(dit, "cpu") as blocks:
        streamed = sample_latent(dit, txt, pooled, blocks=blocks, **kw)
    assert calls == list(range(dit.config.depth)) * 2
    assert torch.equal(plain, counted) and (streamed - plain).abs().max() <= 1e-6


def test_pipeline_stream_runs_the_streaming_runner(tiny_models, monkeypatch):
    import numpy as np

    from kontext import offload
    from kontext.pipeline import KontextPipeline

    pipe = KontextPipeline.from_models_dir(tiny_models["dit"].parents[1], device="cpu", dit_offload="stream")
    assert pipe.dit_offload == "none"  # nothing to stream on the CPU
    used = []
    real = offload.StreamingBlocks._fetch
    monkeypatch.setattr(offload.StreamingBlocks, "_fetch", lambda self, n: (used.append(n), real(self, n)))
    kw = dict(width=64, height=64, steps=1, seed=0)
    plain = np.asarray(pipe.edit("a cat", [], **kw)[0])
    assert not used
    pipe.dit_offload = "stream"  # the GPU case's wiring, run here on the CPU
    streamed = np.asarray(pipe.edit("a cat", [], **kw)[0])
    n = pipe.dit.config.depth + pipe.dit.config.depth_single_blocks
    assert used == list(range(n)) and np.array_equal(plain, streamed)


def test_pipeline_rejects_unknown_dit_offload(tiny_models):
    from kontext.pipeline import KontextPipeline

    with pytest.raises(InputError, match="'none', 'stream'"):
        KontextPipeline.from_models_dir(tiny_models["dit"].parents[1], device="cpu", dit_offload="disk")
    assert PLAIN is not None
