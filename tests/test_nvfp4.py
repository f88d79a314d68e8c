"""The NVFP4 codec (kontext.quant.nvfp4) checked against the format written out here from its specification: E2M1
codes decoded from their bit fields, nibble order, cuBLAS's tiled block-scale layout as an index formula, the
quantisation recipe's exact cases and error bound; and, with COMFYUI_DIR set, against comfy_kitchen byte for byte."""
from __future__ import annotations

import os
import subprocess
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from kontext.quant import nvfp4
from kontext.quant.nvfp4 import (E2M1_VALUES, check_shapes, decode_e2m1, dequantize, encode_e2m1, pack_nibbles,
                                 quantize, swizzle_scales, unpack_nibbles, unswizzle_scales)

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
E4M3 = torch.float8_e4m3fn
MAGNITUDES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def e2m1_from_bits(code: int) -> float:
    """E2M1 by its bit fields (sign, 2 exponent bits with bias 1, 1 mantissa bit; exponent 0 is subnormal)."""
    sign = -1.0 if code & 8 else 1.0
    e, m = (code >> 1) & 3, code & 1
    return sign * (m * 0.5 if e == 0 else 2.0 ** (e - 1) * (1 + m / 2))


def tiled_position(r: int, c: int, n_col_tiles: int) -> int:
    """Where logical scale (r, c) lies in the flattened tiled array (cuBLAS's 1D block scaling factors layout):
    128 x 4 tiles stored tile after tile, and inside a tile row r at (r % 32) * 16 + (r // 32) * 4."""
    rb, cb, r_in, c_in = r // 128, c // 4, r % 128, c % 4
    return (rb * n_col_tiles + cb) * 512 + (r_in % 32) * 16 + (r_in // 32) * 4 + c_in


def random_e4m3(shape: tuple[int, ...], gen: torch.Generator, low: int = 0x08, high: int = 0x7E) -> torch.Tensor:
    """Random positive finite e4m3 values (bytes low..high; 0x08 is 2^-6, the smallest normal; 0x7E is 448)."""
    return torch.randint(low, high + 1, shape, generator=gen, dtype=torch.uint8).view(E4M3)


# ---------------------------------------------------------------- nibbles

def test_pack_unpack_every_byte():
    every = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    codes = unpack_nibbles(every)
    assert codes.shape == (16, 32) and codes.dtype == torch.uint8 and int(codes.max()) == 15
    assert torch.equal(pack_nibbles(codes), every)
    random = torch.randint(0, 16, (7, 40), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(random)), random)


def test_nibble_order_is_high_first():
    assert pack_nibbles(torch.tensor([[1, 2, 3, 4], [15, 0, 0, 9]], dtype=torch.uint8)).tolist() == \
        [[0x12, 0x34], [0xF0, 0x09]]
    assert unpack_nibbles(torch.tensor([[0xAB, 0x70]], dtype=torch.uint8)).tolist() == [[0xA, 0xB, 0x7, 0x0]]


def test_pack_refuses_odd_or_wide_codes():
    with pytest.raises(ValueError, match="even last dimension"):
        pack_nibbles(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        pack_nibbles(torch.zeros(2, 4, dtype=torch.int32))


# ---------------------------------------------------------------- E2M1

def test_e2m1_values_match_bit_fields():
    assert E2M1_VALUES.dtype == torch.float32
    assert E2M1_VALUES.tolist() == [e2m1_from_bits(c) for c in range(16)]
    assert torch.signbit(E2M1_VALUES[8]) and not torch.signbit(E2M1_VALUES[0])


def test_e2m1_exact_on_every_value():
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(encode_e2m1(E2M1_VALUES), codes)  # -0.0 keeps its sign: code 8
    assert torch.equal(decode_e2m1(codes), E2M1_VALUES)
    assert torch.equal(decode_e2m1(codes).signbit(), E2M1_VALUES.signbit())


@pytest.mark.parametrize("x, want", [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0),
                                     (5.0, 4.0)])
def test_e2m1_ties_to_even(x: float, want: float):
    """A midpoint goes to the neighbour whose mantissa bit is 0 (the even code), for both signs."""
    got = decode_e2m1(encode_e2m1(torch.tensor([x, -x])))
    assert got.tolist() == [want, -want]
    # a hair either side of the midpoint goes to the nearer value
    below, above = torch.nextafter(torch.tensor([x, x]), torch.tensor([0.0, 10.0]))
    lower, upper = max(v for v in MAGNITUDES if v < x), min(v for v in MAGNITUDES if v > x)
    assert decode_e2m1(encode_e2m1(torch.stack([below, above]))).tolist() == [lower, upper]


def test_e2m1_clamps_beyond_six():
    x = torch.tensor([6.0, 6.01, 7.0, 100.0, 1e30, -6.5, -1e30])
    assert decode_e2m1(encode_e2m1(x)).tolist() == [6.0, 6.0, 6.0, 6.0, 6.0, -6.0, -6.0]


def test_e2m1_nearest_against_brute_force():
    """Every value goes to the nearest magnitude by distance (float64), ties to the even code."""
    x = (torch.rand(20000, generator=torch.Generator().manual_seed(1)) - 0.5) * 16
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    x = torch.cat([x, midpoints, -midpoints, torch.tensor([0.0, -0.0, 6.0, 7.0, -100.0])])
    mags = torch.tensor(MAGNITUDES, dtype=torch.float64)
    dist = (x.double().abs()[:, None].clamp(max=6.0) - mags).abs() + 1e-12 * (torch.arange(8) % 2)
    want = torch.where(x < 0, -1.0, 1.0).double() * mags[dist.argmin(dim=1)]
    assert torch.equal(decode_e2m1(encode_e2m1(x)).double(), want)


# ---------------------------------------------------------------- tiled block scales

@pytest.mark.parametrize("rows, cols", [(130, 5), (3072, 192), (1, 1), (256, 8), (129, 9)])
def test_swizzle_matches_cublas_layout(rows: int, cols: int):
    scales = torch.arange(1, rows * cols + 1, dtype=torch.int32).reshape(rows, cols)
    tiled = swizzle_scales(scales)
    pr, pc = -(-rows // 128) * 128, -(-cols // 4) * 4
    assert tiled.shape == (pr, pc) and tiled.dtype == scales.dtype
    r = torch.arange(rows)[:, None].expand(rows, cols)
    c = torch.arange(cols)[None, :].expand(rows, cols)
    rb, cb, r_in, c_in = r // 128, c // 4, r % 128, c % 4
    pos = (rb * (pc // 4) + cb) * 512 + (r_in % 32) * 16 + (r_in // 32) * 4 + c_in
    want = torch.zeros(pr * pc, dtype=torch.int32)
    want[pos.flatten()] = scales.flatten()  # every other position is padding: zero
    assert torch.equal(tiled.flatten(), want)
    assert tiled_position(rows - 1, cols - 1, pc // 4) == int(pos[-1, -1])
    assert torch.equal(unswizzle_scales(tiled, rows, cols), scales)
    assert torch.equal(unswizzle_scales(tiled.flatten(), rows, cols), scales)


def test_swizzle_round_trip_e4m3():
    scales = random_e4m3((130, 5), torch.Generator().manual_seed(2))
    tiled = swizzle_scales(scales)
    assert tiled.dtype == E4M3 and tiled.shape == (256, 8)
    assert tiled.view(torch.uint8).sum() == scales.view(torch.uint8).sum()  # the padding is zeros
    assert torch.equal(unswizzle_scales(tiled, 130, 5).view(torch.uint8), scales.view(torch.uint8))
    with pytest.raises(ValueError, match="130 x 5"):
        unswizzle_scales(tiled[:128], 130, 5)


# ---------------------------------------------------------------- quantize -> dequantize

def representable_weight(n: int, k: int, gen: torch.Generator):
    """A weight quantize must reproduce exactly: e2m1 codes times e4m3 block scales times a power-of-two tensor
    scale, every block holding a +-6 (so its scale is its amax / 6) and one block scale 448 (so the tensor scale is
    amax / (448 * 6)). All products are exact in float32."""
    tensor_scale = 2.0 ** -12
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    six = torch.randint(0, nvfp4.BLOCK, (n, k // nvfp4.BLOCK), generator=gen)
    sign = torch.randint(0, 2, six.shape, generator=gen, dtype=torch.uint8) << 3
    codes.view(n, -1, nvfp4.BLOCK).scatter_(2, six[..., None], (7 | sign)[..., None])
    scales = random_e4m3((n, k // nvfp4.BLOCK), gen)
    scales.view(torch.uint8)[0, 0] = 0x7E  # 448
    w = (decode_e2m1(codes).view(n, -1, nvfp4.BLOCK) * scales.float()[..., None] * tensor_scale).view(n, k)
    return w, codes, scales, tensor_scale


@pytest.mark.parametrize("n, k", [(64, 64), (130, 80), (3, 16)])
def test_quantize_exact_on_representable_weights(n: int, k: int):
    w, codes, scales, tensor_scale = representable_weight(n, k, torch.Generator().manual_seed(3))
    q = quantize(w)
    assert q.shape == (n, k) and float(q.tensor_scale) == tensor_scale and q.tensor_scale.dtype == torch.float32
    assert q.tensor_scale.dim() == 0
    assert torch.equal(q.packed, pack_nibbles(codes))
    assert torch.equal(q.block_scales.view(torch.uint8), swizzle_scales(scales).view(torch.uint8))
    assert torch.equal(q.dequantize(), w)
    assert torch.equal(q.dequantize().signbit(), w.signbit())


# Largest rounding error in units of the block's step (block scale * tensor scale), by the magnitude code a value
# got: half the wider gap beside it (0..1.5: 0.5 apart; 2 and 3: up to 1 apart; 4 and 6: 2 apart). Values beyond 6
# are clamped: with a normal e4m3 block scale (rounded by at most 2^-4 relative) they reach at most 6 * (1 + 2^-4)
# = 6.375, within 1 of 6 too.
HALF_GAP = torch.tensor([0.25, 0.25, 0.25, 0.25, 0.5, 0.5, 1.0, 1.0])


def test_quantize_error_bound_gaussian():
    w = torch.randn(1024, 512, generator=torch.Generator().manual_seed(4)) * 0.02
    q = quantize(w)
    n, k = w.shape
    scales = unswizzle_scales(q.block_scales, n, k // nvfp4.BLOCK).float()
    assert bool((scales >= 2.0 ** -6).all())  # normal e4m3 block scales: the bound's premise
    step = (scales * q.tensor_scale).repeat_interleave(nvfp4.BLOCK, dim=1)  # [N, K]
    codes = unpack_nibbles(q.packed)
    err = (q.dequantize() - w).abs()
    bound = HALF_GAP[(codes & 7).long()] * step
    assert bool((err <= bound + 4 * torch.finfo(torch.float32).eps * w.abs()).all())
    rel = float((err / step).max()), float(err.norm() / w.norm())
    print(f"gaussian {n}x{k}: max error {rel[0]:.3f} block steps, relative RMS error {rel[1]:.4f}")
    assert rel[0] <= 1.0 and rel[1] < 0.12


def test_zero_blocks_give_zeros():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    w[3] = 0
    w[5, 16:32] = 0
    w[7, 32:48] = 1e-9  # far below the e4m3 range next to the tensor's amax: its block scale underflows to 0
    q = quantize(w)
    scales = unswizzle_scales(q.block_scales, 32, 4).float()
    codes = unpack_nibbles(q.packed)
    for r, c in [(3, 0), (3, 3), (5, 1), (7, 2)]:
        assert float(scales[r, c]) == 0.0
        assert not codes[r, c * 16:(c + 1) * 16].any()
    d = q.dequantize()
    assert not d.isnan().any() and not d[3].any() and not d[5, 16:32].any()
    zero = quantize(torch.zeros(16, 32))
    assert float(zero.tensor_scale) == 0.0 and not zero.packed.any() and not zero.block_scales.float().any()
    assert torch.equal(zero.dequantize(), torch.zeros(16, 32))


def test_quantize_refuses_bad_weights():
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize(torch.ones(4, 24))
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize(torch.tensor([[float("inf")] * 16]))


# ---------------------------------------------------------------- dequantize against the specification

def spec_dequantize(packed: torch.Tensor, tiled: torch.Tensor, tensor_scale: float, n: int, k: int) -> torch.Tensor:
    """Dequantisation written out from the format, element by element, in float64 (exact: 2 + 4 + 24 significant
    bits), rounded once to float32."""
    flat = tiled.flatten().float().tolist()
    n_col_tiles = tiled.shape[1] // 4
    data = packed.tolist()
    out = [[0.0] * k for _ in range(n)]
    for r in range(n):
        for c in range(k):
            byte = data[r][c // 2]
            code = byte >> 4 if c % 2 == 0 else byte & 0x0F
            out[r][c] = e2m1_from_bits(code) * flat[tiled_position(r, c // 16, n_col_tiles)] * tensor_scale
    return torch.tensor(out, dtype=torch.float64).float()


def test_dequantize_matches_spec():
    gen = torch.Generator().manual_seed(6)
    n, k = 130, 48
    packed = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    tiled = swizzle_scales(random_e4m3((n, k // 16), gen, low=0x01))  # subnormal scales too
    tensor_scale = torch.tensor(0.012345, dtype=torch.float32)
    want = spec_dequantize(packed, tiled, float(tensor_scale), n, k)
    got = dequantize(packed, tiled, tensor_scale, (n, k))
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(dequantize(packed, tiled, tensor_scale, k), want)  # K alone
    for dtype in (torch.bfloat16, torch.float16):  # one rounding, from the float32 value
        assert torch.equal(dequantize(packed, tiled, tensor_scale, (n, k), dtype), want.to(dtype))


# ---------------------------------------------------------------- check_shapes

def good_tensors(n: int = 130, k: int = 48) -> dict:
    return {"weight": torch.zeros(n, k // 2, dtype=torch.uint8),
            "block_scales": torch.zeros(256, 4, dtype=E4M3),
            "tensor_scale": torch.tensor(1.0)}


@pytest.mark.parametrize("change, n, k, message", [
    ({}, 130, 40, "multiple of 16"),
    ({"weight": torch.zeros(130, 48, dtype=torch.uint8)}, 130, 48, r"uint8 \[130, 24\]"),
    ({"weight": torch.zeros(129, 24, dtype=torch.uint8)}, 130, 48, r"got torch.uint8 \[129, 24\]"),
    ({"weight": torch.zeros(130, 24, dtype=torch.int8)}, 130, 48, "got torch.int8"),
    ({"block_scales": torch.zeros(130, 3, dtype=E4M3)}, 130, 48, r"float8_e4m3fn \[256, 4\]"),
    ({"block_scales": torch.zeros(256 * 4, dtype=E4M3)}, 130, 48, r"got torch.float8_e4m3fn \[1024\]"),
    ({"block_scales": torch.zeros(256, 4, dtype=torch.uint8)}, 130, 48, "got torch.uint8"),
    ({"tensor_scale": torch.ones(2)}, 130, 48, "single float32 value"),
    ({"tensor_scale": torch.tensor(1, dtype=torch.int32)}, 130, 48, "got torch.int32"),
])
def test_check_shapes_refuses(change: dict, n: int, k: int, message: str):
    tensors = {**good_tensors(), **change}
    with pytest.raises(ValueError, match=message) as info:
        check_shapes(tensors["weight"], tensors["block_scales"], tensors["tensor_scale"], n, k, name="linear1")
    assert str(info.value).startswith("linear1: ")


def test_check_shapes_accepts_and_dequantize_checks():
    t = good_tensors()
    check_shapes(t["weight"], t["block_scales"], t["tensor_scale"], 130, 48)
    check_shapes(t["weight"], t["block_scales"], t["tensor_scale"].reshape(1), 130, 48)  # [1] as some files store
    assert nvfp4.scale_shape(130, 48) == (256, 4) and nvfp4.scale_shape(3072, 12288) == (3072, 768)
    with pytest.raises(ValueError, match="block scales"):
        dequantize(t["weight"], t["block_scales"][:128], t["tensor_scale"], (130, 48))


# ---------------------------------------------------------------- comfy_kitchen

COMFY_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from safetensors.torch import load_file, save_file
    from comfy_kitchen.backends.eager.quantization import dequantize_nvfp4, quantize_nvfp4
    from comfy_kitchen.tensor.nvfp4 import TensorCoreNVFP4Layout

    t, out = load_file(sys.argv[1]), {}
    for name in sorted({key.split(".")[0] for key in t}):
        w = t[name + ".w"]
        # ComfyUI's own quantisation (the layout computes the tensor scale), and the eager kernel with our scale
        qdata, params = TensorCoreNVFP4Layout.quantize(w)
        out[name + ".packed"], out[name + ".scales"], out[name + ".scale_2"] = qdata, params.block_scale, params.scale
        packed, scales = quantize_nvfp4(w, t[name + ".our_scale_2"])
        out[name + ".eager_packed"], out[name + ".eager_scales"] = packed, scales
        for dtype, tag in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
            out[name + ".deq_" + tag] = dequantize_nvfp4(t[name + ".our_packed"], t[name + ".our_scale_2"],
                                                         t[name + ".our_scales"], dtype)
    save_file(out, sys.argv[2])
""")


def comfy_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    gaussian = torch.randn(256, 256, generator=gen) * 0.03
    gaussian[10, 32:48] = 0  # a zero block
    gaussian[11, :16] = 1e-9  # a block whose scale underflows
    heavy = torch.randn(144, 96, generator=gen) ** 3  # heavy tails: many small block scales, some subnormal
    return {"gaussian": gaussian, "heavy": heavy, "exact": representable_weight(32, 64, gen)[0]}


@pytest.mark.comfyui
@pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout with its .venv (comfy_kitchen)")
def test_matches_comfy_kitchen(tmp_path):
    python = os.path.join(COMFYUI_DIR, ".venv", "bin", "python")
    weights = comfy_inputs()
    ours = {name: quantize(w) for name, w in weights.items()}
    tensors = {}
    for name, w in weights.items():
        q = ours[name]
        tensors.update({f"{name}.w": w, f"{name}.our_packed": q.packed, f"{name}.our_scales": q.block_scales,
                        f"{name}.our_scale_2": q.tensor_scale})
    save_file(tensors, tmp_path / "in.safetensors")
    (tmp_path / "run.py").write_text(COMFY_SCRIPT)
    subprocess.run([python, str(tmp_path / "run.py"), str(tmp_path / "in.safetensors"),
                    str(tmp_path / "out.safetensors")], check=True, cwd=COMFYUI_DIR, timeout=120)
    theirs = load_file(tmp_path / "out.safetensors")
    for name, q in ours.items():
        # the same recipe gives the same bytes
        assert float(theirs[f"{name}.scale_2"]) == float(q.tensor_scale), name
        for prefix in ("", "eager_"):
            assert torch.equal(theirs[f"{name}.{prefix}packed"], q.packed), name
            assert torch.equal(theirs[f"{name}.{prefix}scales"].view(torch.uint8), q.block_scales.view(torch.uint8))
        # float32: comfy_kitchen rounds (tensor scale * block scale) before multiplying by the e2m1 value, we round
        # once (e2m1 * block scale is exact); products by 1.5, 3 or 6 may then differ by one float32 ulp.
        ref = spec_dequantize(q.packed, q.block_scales, float(q.tensor_scale), *q.shape) if name == "exact" else None
        deq = q.dequantize()
        if ref is not None:
            assert torch.equal(deq, ref)
        their32 = theirs[f"{name}.deq_f32"]
        assert torch.equal(deq == 0, their32 == 0) and not their32.isnan().any()
        ulp = torch.finfo(torch.float32).eps * deq.abs()
        assert bool(((deq - their32).abs() <= ulp).all()), name
        # bf16: comfy_kitchen computes in bf16 (two bf16 roundings), we cast the float32 value once
        their16 = theirs[f"{name}.deq_bf16"].float()
        ours16 = q.dequantize(torch.bfloat16).float()
        assert bool(((ours16 - their16).abs() <= 2 ** -7 * deq.abs()).all()), name
        print(f"{name}: float32 dequantisation equal on {float((deq == their32).float().mean()):.4f} of elements, "
              f"bf16 on {float((ours16 == their16).float().mean()):.4f}")
