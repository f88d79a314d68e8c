"""GPU behaviour (marked `gpu`, skipped without CUDA): bf16 on the device, offloading, memory released on cancel.

    python -m pytest -q -m gpu tests/test_gpu.py
"""
from __future__ import annotations

import pytest
import torch
from conftest import rel_err

import kontext
from kontext.errors import Cancelled
from kontext.pipeline import KontextPipeline

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_dit_bf16_on_gpu_close_to_fp32_on_cpu(tiny_models):
    from kontext.ids import image_ids, text_ids

    gen = torch.Generator().manual_seed(0)
    img_ids = image_ids((8, 12), [(12, 8), (8, 8)], batch=2)  # target 64x96 px, two references
    img = torch.randn(2, img_ids.shape[1], 64, generator=gen)
    txt, txt_ids = torch.randn(2, 7, 64, generator=gen), text_ids(7, 2)
    t, y, g = torch.full((2,), 0.7), torch.randn(2, 64, generator=gen), torch.full((2,), 2.5)
    with torch.no_grad():
        ref = kontext.load_dit(tiny_models["dit"])(img, img_ids, txt, txt_ids, t, y, g)
        gpu = kontext.load_dit(tiny_models["dit"], device="cuda")  # bf16 by default on CUDA
        assert gpu.dtype == torch.bfloat16
        out = gpu(*(a.cuda() for a in (img, img_ids, txt, txt_ids, t, y, g)))
    assert torch.isfinite(out).all() and rel_err(out.float().cpu(), ref) <= 2e-2


@pytest.fixture(scope="module")
def pipe(tiny_models):
    return KontextPipeline.from_models_dir(tiny_models["dit"].parents[1], device="cuda")


def test_text_encoders_visit_the_gpu_only_to_encode(pipe):
    assert pipe.offload and next(pipe.t5.parameters()).device.type == "cpu"
    txt, pooled = pipe.encode(["make it night"])
    assert txt.device.type == "cuda" and pooled.device.type == "cuda"
    assert next(pipe.t5.parameters()).device.type == "cpu" and next(pipe.clip.parameters()).device.type == "cpu"


def test_edit_and_cancel_release_gpu_memory(pipe):
    from PIL import Image

    ref = Image.new("RGB", (128, 128), (120, 60, 30))
    pipe.edit("x", [ref], steps=2, resize_references=False)  # warm-up: allocator pools and kernels
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()

    def cancel(step, total, latent):
        raise Cancelled("stop")

    with pytest.raises(Cancelled):
        pipe.edit("x", [ref], steps=5, resize_references=False, callback=cancel)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= base + 1024 * 1024  # nothing of the run is left behind
    out = pipe.edit("x", [ref], steps=2, resize_references=False)[0]
    assert out.size == (128, 128)
