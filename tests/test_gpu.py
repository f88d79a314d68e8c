"""GPU behaviour (marked `gpu`, skipped without CUDA): bf16 on the device, offloading, memory released on cancel, and
on Blackwell (compute capability >= 10) the NVFP4 tensor-core matmuls.

    python -m pytest -q -m gpu tests/test_gpu.py
"""
from __future__ import annotations

import logging

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


def _blackwell() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (10, 0)


@pytest.mark.skipif(not _blackwell(), reason="NVFP4 matmuls need FP4 tensor cores (compute capability >= 10.0)")
def test_fp4_tensor_core_path_on_blackwell(monkeypatch, caplog):
    """The NVFP4 matmul (W4A4) of a 4096 x 3072 layer on 4608 tokens against the kernel's own arithmetic, the
    weight-only path (W4A16) and the dense product.

    Bounds (relative Frobenius): NVFP4 rounding of Gaussian values costs e = 0.095 per operand (measured by CPU
    emulation at these sizes; tests/test_nvfp4.py bounds it by 0.12). The errors of the two operands are
    independent, so W4A4 sits at about sqrt(2) * e = 0.134 from the dense product and e = 0.095 from W4A16: the
    bounds 0.15 and 0.11 leave ~10% for the bf16 output. Against the product of the very operands the kernel read
    (decoded in float32) only the bf16 output rounding and the accumulation order remain (~0.002): bound 0.01. A
    wrong nibble order, scale layout or tensor scale is off by 0.5 or more on every measure."""
    from kontext import ops
    from kontext.formats import layer as format_layer
    from kontext.quant import fp4_mm, nvfp4

    monkeypatch.setattr(format_layer, "_logged", set())
    monkeypatch.setattr(fp4_mm, "_failed", None)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4096, 3072, generator=gen) * 0.02
    x = torch.randn(4608, 3072, generator=gen).to("cuda", torch.bfloat16)
    bias = torch.randn(4096, generator=gen).cuda()
    q = nvfp4.quantize(w)
    layers = {}
    for name, b in (("plain", None), ("biased", bias)):
        layer = ops.Fp4Linear(3072, 4096, bias=b is not None, device="cuda")
        with torch.no_grad():
            for p, t in ((layer.weight, q.packed), (layer.weight_scale, q.block_scales),
                         (layer.weight_scale_2, q.tensor_scale)):
                p.copy_(t)
            if b is not None:
                layer.bias.copy_(b)
        layers[name] = layer
    with caplog.at_level(logging.INFO, logger="kontext"), torch.no_grad():
        assert layers["plain"].path(x).path != fp4_mm.WEIGHT_ONLY
        fast, fast_biased = layers["plain"](x), layers["biased"](x)
        a = fp4_mm.quantize_activation(x)  # the bytes the kernel read (the quantiser is deterministic)
    assert not fp4_mm.kernel_failed(), fp4_mm._failed
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    wd = q.dequantize().cuda()
    emulated = nvfp4.dequantize(*a, (a[0].shape[0], 3072))[:4608] @ wd.T
    w4a16 = torch.nn.functional.linear(x, wd.to(torch.bfloat16)).float()
    dense = x.float() @ w.cuda().T

    def rel(p: torch.Tensor, r: torch.Tensor) -> float:
        return float((p.double() - r.double()).norm() / r.double().norm())

    assert fast.dtype == torch.bfloat16 and fast.shape == (4608, 4096)
    assert rel(fast, emulated) <= 0.01
    assert rel(fast, w4a16) <= 0.11
    assert rel(fast, dense) <= 0.15
    # the bias is added once, unscaled (the kernel's epilogue): the two outputs differ by it alone
    assert rel(fast_biased.float() - fast.float(), bias.expand(4608, -1)) <= 0.02
