"""NVFP4 matmuls (kontext.quant.fp4_mm, Fp4Linear's fast path) checked on the CPU against a block-scaled matmul
written out here: an independent decoder of both operands (E2M1 from its bit fields, the tiled scales by their index
formula, the nibble order as a parameter) and a float64 product. The kernel itself needs a Blackwell GPU
(tests/test_gpu.py); here torch's meta checks validate our exact call (shapes, dtypes, strides, recipes) and an
emulated kernel stands in for cuBLAS, reading the bytes low nibble first as torch's float4_e2m1fn_x2 does."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from kontext.formats import layer as format_layer
from kontext.ops import Fp4Linear
from kontext.quant import fp4_mm, nvfp4

E4M3 = torch.float8_e4m3fn


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of a against b."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


# ---------------------------------------------------------------- an independent decoder

def e2m1(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes -> float64 by the bit fields: sign, 2 exponent bits (bias 1, 0 subnormal), 1 mantissa bit."""
    c = codes.long()
    sign = 1.0 - 2.0 * ((c >> 3) & 1).double()
    e, m = ((c >> 1) & 3).double(), (c & 1).double()
    return sign * torch.where(e == 0, m * 0.5, 2.0 ** (e - 1) * (1 + m / 2))


def codes_of(packed: torch.Tensor, order: str) -> torch.Tensor:
    """Bytes [R, K/2] -> codes [R, K], reading each byte high nibble first ("hi") or low nibble first ("lo")."""
    hi, lo = packed.long() >> 4, packed.long() & 0x0F
    return torch.stack([hi, lo] if order == "hi" else [lo, hi], dim=-1).flatten(-2)


def tiled_scales(tiled: torch.Tensor, rows: int, blocks: int) -> torch.Tensor:
    """float64 block scales [rows, blocks] read from the flat tiled layout: 128 x 4 tiles stored tile after tile,
    row r of a tile at (r % 32) * 16 + (r // 32) * 4."""
    flat = tiled.reshape(-1).double()
    r, c = torch.arange(rows)[:, None], torch.arange(blocks)[None, :]
    n_col_tiles = -(-blocks // 4)
    pos = ((r // 128) * n_col_tiles + c // 4) * 512 + (r % 128 % 32) * 16 + (r % 128 // 32) * 4 + c % 4
    return flat[pos]


def decode(packed: torch.Tensor, tiled: torch.Tensor, tensor_scale: torch.Tensor, order: str = "hi") -> torch.Tensor:
    rows, k = packed.shape[0], packed.shape[1] * 2
    values = e2m1(codes_of(packed, order)).view(rows, k // 16, 16)
    return (values * tiled_scales(tiled, rows, k // 16)[..., None]).view(rows, k) * float(tensor_scale)


def emulated_kernel(a: tuple, w: tuple, order: str = "lo", tensor_scales: bool = True) -> torch.Tensor:
    """What a block-scaled FP4 kernel computes, in float64: sum over K of the decoded products, the block scales
    applied per 16 values, then (two-level recipe) the product of the tensor scales."""
    one = torch.tensor(1.0)
    da = decode(a[0], a[1], a[2] if tensor_scales else one, order)
    dw = decode(w[0], w[1], w[2] if tensor_scales else one, order)
    return da @ dw.T


def make_weight(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, nvfp4.NVFP4Weight]:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    return w, nvfp4.quantize(w)


def make_layer(q: nvfp4.NVFP4Weight, bias: torch.Tensor | None = None) -> Fp4Linear:
    n, k = q.shape
    layer = Fp4Linear(k, n, bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(q.packed)
        layer.weight_scale.copy_(q.block_scales)
        layer.weight_scale_2.copy_(q.tensor_scale)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


@pytest.fixture
def fresh_state(monkeypatch):
    """A process where no fp4 path was logged and no kernel failed yet."""
    monkeypatch.setattr(format_layer, "_logged", set())
    monkeypatch.setattr(fp4_mm, "_failed", None)


# ---------------------------------------------------------------- the activation quantiser

@pytest.mark.parametrize("m", [200, 128, 1])
def test_activation_quantiser_layout(m: int):
    k = 96
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(1)) * 3).to(torch.bfloat16)
    packed, tiled, scale = fp4_mm._quantize_activation(x)
    rows = -(-m // 16) * 16
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (rows, k // 2) and packed.is_contiguous()
    assert tiled.dtype == E4M3 and tuple(tiled.shape) == (-(-m // 128) * 128, 8) and tiled.is_contiguous()
    assert scale.dtype == torch.float32 and scale.numel() == 1
    assert torch.equal(scale, x.float().abs().amax() / (448.0 * 6.0))  # dynamic per-tensor scale, float32
    assert not packed[m:].any()  # padded rows: zero codes
    logical = tiled_scales(tiled, tiled.shape[0], 8)
    assert not logical[m:].any() and not logical[:, k // 16:].any()  # padded scales are zeros
    got = decode(packed, tiled, scale)[:m]
    assert rel(got, x.float()) < 0.12  # NVFP4's error on Gaussian values (about 0.095)
    # the codec's own dequantisation agrees with the independent decoder
    ours = nvfp4.dequantize(packed, tiled, scale, (rows, k))[:m]
    assert rel(ours, got) < 1e-6


def test_activation_quantiser_is_the_weight_recipe():
    """On a weight-shaped input, the activation quantiser gives the weight codec's bytes."""
    w, q = make_weight(128, 64, seed=2)
    packed, tiled, scale = fp4_mm._quantize_activation(w)
    assert torch.equal(packed, q.packed) and torch.equal(scale, q.tensor_scale)
    assert torch.equal(tiled.view(torch.uint8), q.block_scales.view(torch.uint8))


@pytest.mark.slow
def test_compiled_quantiser_matches_eager():
    """The fused (torch.compile, dynamic in M, one graph) quantiser gives the eager bytes: the CPU compiles the same
    graph the GPU does (its code generation differs)."""
    compiled = torch.compile(fp4_mm._quantize_activation, dynamic=True, fullgraph=True)
    gen = torch.Generator().manual_seed(3)
    for m in (40, 200):
        x = torch.randn(m, 64, generator=gen).to(torch.bfloat16)
        x[1, 16:32] = 0  # a zero block
        for want, got in zip(fp4_mm._quantize_activation(x), compiled(x), strict=True):
            assert want.dtype == got.dtype and want.shape == got.shape
            assert torch.equal(want.view(torch.uint8), got.view(torch.uint8)) if want.dtype == E4M3 else \
                torch.equal(want, got)


# ---------------------------------------------------------------- the block-scaled product and the nibble order

def test_emulated_product_matches_reference():
    m, k, n = 200, 128, 48
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    _, q = make_weight(n, k, seed=5)
    a = fp4_mm._quantize_activation(x)
    w = (q.packed, q.block_scales, q.tensor_scale)
    reference = decode(*a)[:m] @ decode(*w).T  # our format, read as it is written (high nibble first)
    ours = nvfp4.dequantize(a[0], a[1], a[2], (a[0].shape[0], k))[:m].double() @ q.dequantize().double().T
    assert rel(ours, reference) < 1e-6
    # the kernel reads low nibble first in both operands: the same product
    assert rel(emulated_kernel(a, w)[:m], reference) < 1e-12
    # without the tensor scales the product is off by their product: the two-level recipe needs both
    assert rel(emulated_kernel(a, w, tensor_scales=False)[:m] * (float(a[2]) * float(w[2])), reference) < 1e-12
    assert rel(emulated_kernel(a, w, tensor_scales=False)[:m], reference) > 0.5


def swap_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return (packed << 4) | (packed >> 4)


def test_nibble_swap_in_both_operands_cancels():
    """Read both operands with the other nibble order: the dot product is unchanged, since every byte's pair swaps
    in both and a 16-value block is 8 whole bytes (each value keeps its block scale). Swap one: it changes."""
    m, k, n = 64, 64, 32
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(6))
    _, q = make_weight(n, k, seed=7)
    a = fp4_mm._quantize_activation(x)
    w = (q.packed, q.block_scales, q.tensor_scale)
    base = emulated_kernel(a, w, order="hi")
    both = emulated_kernel((swap_nibbles(a[0]), *a[1:]), (swap_nibbles(w[0]), *w[1:]), order="hi")
    one = emulated_kernel((swap_nibbles(a[0]), *a[1:]), w, order="hi")
    assert rel(both, base) < 1e-12
    assert rel(one, base) > 0.5


# ---------------------------------------------------------------- our call, checked by torch's meta functions

def meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


@pytest.mark.parametrize("api", [fp4_mm.TWO_LEVEL, fp4_mm.ONE_LEVEL])
def test_call_passes_torch_checks(api: str):
    """Meta tensors get torch's CUDA checks (row-major A, column-major B, sides, the recipe's scale counts and
    dtypes): our exact call on tensors shaped as our quantiser and the codec make them."""
    m, k, n = 200, 3072, 4096
    a = tuple(meta(t) for t in fp4_mm._quantize_activation(torch.zeros(m, k)))
    w = tuple(meta(t) for t in (torch.zeros(n, k // 2, dtype=torch.uint8), torch.zeros(*nvfp4.scale_shape(n, k),
                                                                                        dtype=E4M3), torch.ones(())))
    bias = torch.empty(n, dtype=torch.bfloat16, device="meta")
    out = fp4_mm.nvfp4_mm(a, w, torch.bfloat16, bias, api)
    assert tuple(out.shape) == (208, n) and out.dtype == torch.bfloat16
    # the checks bite: scales for the unpadded rows are refused
    short = (a[0], meta(torch.zeros(m * k // 16, dtype=E4M3)), a[2])
    with pytest.raises(RuntimeError, match="scale"):
        fp4_mm.nvfp4_mm(short, w, torch.bfloat16, None, api)


# ---------------------------------------------------------------- the layer on an emulated Blackwell

class EmulatedKernels:
    """Stands in for F.scaled_mm and torch._scaled_mm: validates the call with torch's meta checks, then computes
    the product as the kernel would (bytes read low nibble first), counting calls."""

    def __init__(self):
        self.calls = 0

    def scaled_mm(self, mat_a, mat_b, scale_a, scale_recipe_a, scale_b, scale_recipe_b, swizzle_a=None,
                  swizzle_b=None, bias=None, output_dtype=torch.bfloat16, **kwargs):
        self.calls += 1
        meta_args = [meta(mat_a), meta(mat_b), [meta(s) for s in scale_a], scale_recipe_a,
                     [meta(s) for s in scale_b], scale_recipe_b]
        REAL_SCALED_MM(*meta_args, swizzle_a=swizzle_a, swizzle_b=swizzle_b,
                       bias=None if bias is None else meta(bias), output_dtype=output_dtype)
        # torch's C++ (not its meta function) wants one swizzle entry per scale for the two-level recipe
        assert len(swizzle_a) == len(scale_a) == 2 and len(swizzle_b) == len(scale_b) == 2
        a = (mat_a.view(torch.uint8), scale_a[0], scale_a[1])
        w = (mat_b.t().view(torch.uint8), scale_b[0], scale_b[1])
        out = emulated_kernel(a, w)
        return (out if bias is None else out + bias.double()).to(output_dtype)

    def _scaled_mm(self, mat_a, mat_b, scale_a, scale_b, bias=None, out_dtype=None, **kwargs):
        self.calls += 1
        REAL_LEGACY(meta(mat_a), meta(mat_b), meta(scale_a), meta(scale_b), out_dtype=out_dtype)
        one = torch.tensor(1.0)
        out = emulated_kernel((mat_a.view(torch.uint8), scale_a, one), (mat_b.t().view(torch.uint8), scale_b, one))
        return out.to(out_dtype)


REAL_SCALED_MM, REAL_LEGACY = F.scaled_mm, torch._scaled_mm


@pytest.fixture
def blackwell(monkeypatch, fresh_state):
    """A CPU that passes for compute capability 10.0, with emulated kernels."""
    kernels = EmulatedKernels()
    monkeypatch.setattr(fp4_mm, "capability", lambda device: (10, 0))
    monkeypatch.setattr(F, "scaled_mm", kernels.scaled_mm)
    monkeypatch.setattr(torch, "_scaled_mm", kernels._scaled_mm)
    return kernels


@pytest.mark.parametrize("api", [fp4_mm.TWO_LEVEL, fp4_mm.ONE_LEVEL])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_layer_fast_path_matches_block_scaled_reference(blackwell, monkeypatch, caplog, api, dtype):
    monkeypatch.setattr(fp4_mm, "torch_api", lambda: api)
    b, t, k, n = 2, 75, 128, 48  # 150 tokens: padded to 160 rows, scales to 256
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(b, t, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen)
    _, q = make_weight(n, k, seed=9)
    layer = make_layer(q, bias)
    with caplog.at_level(logging.INFO, logger="kontext.ops"):
        out = layer(x)
    assert blackwell.calls == 1 and out.shape == (b, t, n) and out.dtype == dtype
    a = fp4_mm._quantize_activation(x.reshape(-1, k))
    reference = (decode(*a)[: b * t] @ decode(q.packed, q.block_scales, q.tensor_scale).T).view(b, t, n)
    reference = reference + bias.to(dtype).double()
    assert rel(out, reference) < 2 ** -7  # the bf16 output's rounding
    assert rel(out, F.linear(x.float(), q.dequantize(), bias)) < 0.12  # and it is the layer's product
    assert [r.levelname for r in caplog.records] == ["INFO"] and "W4A4" in caplog.records[0].getMessage()


@pytest.mark.parametrize("capability, full_precision, has_function, api, path, fallback", [
    (None, False, False, fp4_mm.TWO_LEVEL, fp4_mm.WEIGHT_ONLY, False),  # the CPU
    ((8, 0), False, False, fp4_mm.TWO_LEVEL, fp4_mm.WEIGHT_ONLY, False),  # Ampere: W4A16 is its path
    ((9, 0), False, False, fp4_mm.TWO_LEVEL, fp4_mm.WEIGHT_ONLY, False),  # Hopper
    ((10, 0), False, False, fp4_mm.TWO_LEVEL, fp4_mm.TWO_LEVEL, False),  # Blackwell
    ((12, 0), False, False, fp4_mm.TWO_LEVEL, fp4_mm.TWO_LEVEL, False),  # consumer Blackwell
    ((10, 0), False, False, fp4_mm.ONE_LEVEL, fp4_mm.ONE_LEVEL, False),  # an older torch
    ((10, 0), True, False, fp4_mm.TWO_LEVEL, fp4_mm.WEIGHT_ONLY, False),  # full precision
    ((10, 0), False, True, fp4_mm.TWO_LEVEL, fp4_mm.WEIGHT_ONLY, False),  # a run-time weight function
    ((12, 0), False, False, None, fp4_mm.WEIGHT_ONLY, True),  # a torch without NVFP4 matmuls: a warning
])
def test_choose_path(capability, full_precision, has_function, api, path, fallback):
    choice = fp4_mm.choose_path(capability, full_precision, has_function, api)
    assert (choice.path, choice.fallback) == (path, fallback)
    assert choice.label.startswith("NVFP4 matmuls" if path != fp4_mm.WEIGHT_ONLY else "weight-only (W4A16)")


def test_choose_path_sides_and_failures():
    bad_sides = fp4_mm.choose_path((10, 0), False, False, fp4_mm.TWO_LEVEL, sides_ok=False)
    failed = fp4_mm.choose_path((10, 0), False, False, fp4_mm.TWO_LEVEL, kernel_failed=True)
    assert bad_sides.path == failed.path == fp4_mm.WEIGHT_ONLY and bad_sides.fallback and failed.fallback
    assert failed.label == fp4_mm.FAILED_LABEL
    assert fp4_mm.choose_path((9, 0), False, False, fp4_mm.TWO_LEVEL, kernel_failed=True).fallback is False


def test_hopper_and_weight_functions_stay_weight_only(blackwell, monkeypatch, caplog):
    _, q = make_weight(32, 64, seed=10)
    layer = make_layer(q)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(11))
    want = F.linear(x, q.dequantize())
    layer.weight_function = [lambda w: w * 2]
    with caplog.at_level(logging.INFO, logger="kontext.ops"):
        assert torch.equal(layer(x), F.linear(x, q.dequantize() * 2))
        layer.weight_function = []
        monkeypatch.setattr(fp4_mm, "capability", lambda device: (9, 0))
        assert torch.equal(layer(x), want)
    assert blackwell.calls == 0 and all(r.levelname == "INFO" for r in caplog.records)


def test_cpu_stays_weight_only(fresh_state, caplog):
    _, q = make_weight(32, 64, seed=12)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(13))
    with caplog.at_level(logging.INFO, logger="kontext.ops"):
        out = make_layer(q)(x)
    assert torch.equal(out, F.linear(x, q.dequantize()))
    assert [r.levelname for r in caplog.records] == ["INFO"] and "W4A16" in caplog.records[0].getMessage()


# ---------------------------------------------------------------- a kernel that refuses

def test_failed_kernel_falls_back_once_for_all_layers(blackwell, monkeypatch, caplog):
    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED when calling cublasLtMatmul")

    monkeypatch.setattr(F, "scaled_mm", refuse)
    gen = torch.Generator().manual_seed(14)
    layers = [make_layer(make_weight(48, 64, seed=s)[1], torch.randn(48, generator=gen)) for s in (15, 16)]
    x = torch.randn(2, 7, 64, generator=gen).to(torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="kontext.ops"):
        for _ in range(2):
            for layer in layers:
                want = F.linear(x, layer.dequantized(x.dtype), layer.bias.to(x.dtype))  # the W4A16 result
                assert torch.equal(layer(x), want)
    assert len(calls) == 1 and fp4_mm.kernel_failed()  # one try, then every layer is weight-only
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "CUBLAS_STATUS_NOT_SUPPORTED" in warnings[0] and "W4A16" in warnings[0]


def test_out_of_memory_is_not_a_kernel_failure(blackwell, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(F, "scaled_mm", oom)
    layer = make_layer(make_weight(32, 64, seed=17)[1])
    with pytest.raises(torch.OutOfMemoryError):
        layer(torch.randn(4, 64))
    assert not fp4_mm.kernel_failed()


def test_empty_input_is_not_a_kernel_failure(blackwell):
    layer = make_layer(make_weight(32, 64, seed=18)[1])
    assert layer(torch.zeros(0, 64)).shape == (0, 32)
    assert blackwell.calls == 0 and not fp4_mm.kernel_failed()
