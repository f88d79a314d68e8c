"""NVFP4 weights: the storage codec of ComfyUI's mixed-precision files (and of BFL's flux1-kontext-dev-nvfp4).

A linear weight W [N, K] (N out features, K in features, K a multiple of 16) is stored as three tensors:
- `weight`: uint8 [N, K/2], two 4-bit E2M1 codes per byte, the high nibble first (element 2j in bits 4-7, 2j+1 in
  bits 0-3). A code is sign, 2 exponent bits, 1 mantissa bit: codes 0..7 mean 0, 0.5, 1, 1.5, 2, 3, 4, 6 and codes
  8..15 their negatives.
- `weight_scale`: float8_e4m3fn block scales, one per 16 consecutive values along K (logically [N, K/16]), stored in
  cuBLAS's tiled block-scaling-factor layout so Blackwell's FP4 matmuls can read them as they are, zero padded to
  [roundup(N, 128), roundup(K/16, 4)] (`swizzle_scales`).
- `weight_scale_2`: a float32 tensor scale.
value = e2m1(code) * float(block scale) * tensor scale.

Quantisation follows the standard NVFP4 recipe, in float32: the tensor scale maps the largest |w| to the largest
block scale times the largest E2M1 value (448 * 6), each block scale maps its block's largest |w| to 6 and is
rounded to e4m3, and each value is rounded to the nearest E2M1 value, ties to even. On float32 weights this gives
comfy_kitchen's bytes exactly; on bf16 ones ComfyUI computes the tensor scale in bf16 (one rounding we skip), so
some bytes differ there.
Everything here is plain torch, for the CPU and for GPUs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BLOCK", "E2M1_VALUES", "NVFP4Weight", "check_shapes", "decode_e2m1", "dequantize", "encode_e2m1",
           "pack_nibbles", "quantize", "quantize_blocks", "scale_shape", "swizzle_scales", "tensor_scale",
           "unpack_nibbles", "unswizzle_scales"]

BLOCK = 16  # values per block scale, consecutive along K
TILE_ROWS, TILE_COLS = 128, 4  # one cuBLAS scale tile: 128 rows x 4 block columns, 512 scales
E2M1_MAX = 6.0
E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448

# Code c -> value: the sign is bit 3, so codes 8..15 are 0..7 negated (code 8 is -0).
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float32)

# Midpoints between neighbouring magnitudes. Ties go to the even code (mantissa bit 0, as IEEE rounding does): at a
# midpoint above an even code the tie stays down, above an odd code it goes up. Counting the midpoints below |x|
# (strictly for the first kind, inclusively for the second) gives the magnitude code, and saturates at 7 (= 6).
_TIE_STAYS_DOWN = torch.tensor([0.25, 1.25, 2.5, 5.0])  # above codes 0, 2, 4, 6
_TIE_GOES_UP = torch.tensor([0.75, 1.75, 3.5])  # above codes 1, 3, 5

_tables: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(name: str, device: torch.device) -> torch.Tensor:
    """The small constant tensor `name` on `device`, copied there once (dequantisation runs at every layer call)."""
    key = (name, device)
    if key not in _tables:
        if name == "pairs":  # byte -> its two values (high nibble first) [256, 2]: one gather per byte
            t = E2M1_VALUES[unpack_nibbles(torch.arange(256, dtype=torch.uint8)[:, None]).long()]
        else:
            t = {"values": E2M1_VALUES, "down": _TIE_STAYS_DOWN, "up": _TIE_GOES_UP}[name]
        _tables[key] = t.to(device)
    return _tables[key]


def _roundup(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def scale_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """The stored (tiled, padded) shape of the block scales of a weight [out_features, in_features]."""
    return _roundup(out_features, TILE_ROWS), _roundup(in_features // BLOCK, TILE_COLS)


# ---------------------------------------------------------------- E2M1 codes and nibbles

def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """x (any shape, float) -> uint8 codes of the same shape: |x| rounded to the nearest E2M1 magnitude, ties to
    even, beyond 6 clamped to 6; the sign bit is kept, so a small negative value gives code 8 ("-0")."""
    x = x.float()
    mag = x.abs()
    code = torch.bucketize(mag, _table("down", x.device), out_int32=True)
    code += torch.bucketize(mag, _table("up", x.device), out_int32=True, right=True)
    return code.to(torch.uint8) | (torch.signbit(x).to(torch.uint8) << 3)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (any shape, values 0..15) -> their float32 values."""
    return _table("values", codes.device)[codes.int()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes [..., K] uint8 (values 0..15, K even) -> [..., K/2], element 2j in the high nibble, 2j+1 in the low."""
    if codes.dtype != torch.uint8 or codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles needs uint8 codes with an even last dimension, got {codes.dtype} "
                         f"{tuple(codes.shape)}")
    return (codes[..., 0::2] << 4) | codes[..., 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """packed [..., K/2] uint8 -> codes [..., K] uint8 (high nibble first)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_nibbles needs uint8 bytes, got {packed.dtype}")
    return torch.stack([packed >> 4, packed & 0x0F], dim=-1).flatten(-2)


# ---------------------------------------------------------------- block scales in cuBLAS's tiled layout

def swizzle_scales(scales: torch.Tensor) -> torch.Tensor:
    """scales [R, C] (one per block) -> cuBLAS's tiled layout [roundup(R, 128), roundup(C, 4)], same dtype.

    The matrix is zero padded, then cut into tiles of 128 rows x 4 columns, stored tile after tile (row of tiles
    major). Inside a tile, row r sits at (r % 32) * 16 + (r // 32) * 4, its 4 columns contiguous: read as a 2-D
    array, a tile is 32 rows of 16, which is why the stored shape equals the padded one.
    """
    rows, cols = scales.shape
    pr, pc = _roundup(rows, TILE_ROWS), _roundup(cols, TILE_COLS)
    padded = scales.new_zeros(pr, pc)
    padded[:rows, :cols] = scales
    # [row tile, r // 32, r % 32, column tile, c] -> [row tile, column tile, r % 32, r // 32, c]
    tiles = padded.view(pr // TILE_ROWS, 4, 32, pc // TILE_COLS, TILE_COLS).permute(0, 3, 2, 1, 4)
    return tiles.reshape(pr, pc)


def unswizzle_scales(tiled: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The inverse of `swizzle_scales`: tiled (2-D or flat, roundup(rows, 128) * roundup(cols, 4) scales) ->
    [rows, cols]."""
    pr, pc = _roundup(rows, TILE_ROWS), _roundup(cols, TILE_COLS)
    if tiled.numel() != pr * pc:
        raise ValueError(f"tiled block scales for {rows} x {cols} hold {pr} x {pc} values, got {tuple(tiled.shape)}")
    # [row tile, column tile, r % 32, r // 32, c] -> [row tile, r // 32, r % 32, column tile, c]
    tiles = tiled.reshape(pr // TILE_ROWS, pc // TILE_COLS, 32, 4, TILE_COLS).permute(0, 3, 2, 1, 4)
    return tiles.reshape(pr, pc)[:rows, :cols]


# ---------------------------------------------------------------- weights

@dataclass(frozen=True)
class NVFP4Weight:
    """One quantised weight, as a file stores it (see the module docstring)."""

    packed: torch.Tensor  # uint8 [N, K/2], two E2M1 codes a byte, high nibble first
    block_scales: torch.Tensor  # float8_e4m3fn [roundup(N, 128), roundup(K/16, 4)], cuBLAS tiled layout
    tensor_scale: torch.Tensor  # float32, 0-dim
    shape: tuple[int, int]  # (N, K)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K] in `dtype`."""
        return dequantize(self.packed, self.block_scales, self.tensor_scale, self.shape, dtype)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors under the names ComfyUI's files give them (`prefix` is the layer's, e.g. "linear1.")."""
        return {f"{prefix}weight": self.packed, f"{prefix}weight_scale": self.block_scales,
                f"{prefix}weight_scale_2": self.tensor_scale}


def _block_scales(blocks: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """blocks [N, K/16, 16] float32 -> e4m3 block scales [N, K/16] that map each block's largest |w| to 6.

    Divided in this order (amax / 6 / tensor scale) as comfy_kitchen does, so both give the same bytes. An all-zero
    weight has a zero tensor scale: its block scales are zero, not 0/0."""
    amax = blocks.abs().amax(dim=-1)
    scales = torch.where(tensor_scale > 0, amax / E2M1_MAX / tensor_scale, torch.zeros_like(amax))
    return scales.clamp(max=E4M3_MAX).to(E4M3)


def tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """The float32 tensor scale (0-dim) of the standard recipe: the largest |x| maps to 448 * 6."""
    return x.float().abs().amax() / (E4M3_MAX * E2M1_MAX)


def quantize_blocks(x: torch.Tensor, tensor_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] float32 (K a multiple of 16) and its tensor scale -> (packed uint8 [R, K/2], high nibble first;
    e4m3 block scales [R, K/16], not yet tiled). The recipe's body, shared by weights (`quantize`) and by the
    activations of NVFP4 matmuls (kontext.quant.fp4_mm): plain tensor ops, so torch.compile can fuse them.

    A block whose scale is zero (all zeros, or so small next to the tensor's largest value that its scale
    underflows e4m3) gets zero codes."""
    r, k = x.shape
    blocks = x.reshape(r, k // BLOCK, BLOCK)
    scales = _block_scales(blocks, tensor_scale)  # e4m3 [R, K/16]
    step = (tensor_scale * scales.float())[..., None]  # [R, K/16, 1]: what one E2M1 unit is worth
    zero = step == 0
    scaled = torch.where(zero, torch.zeros_like(blocks), blocks / torch.where(zero, torch.ones_like(step), step))
    return pack_nibbles(encode_e2m1(scaled).reshape(r, k)), scales


def quantize(w: torch.Tensor) -> NVFP4Weight:
    """w [N, K] floating point (K a multiple of 16) -> its NVFP4 form, by the standard recipe (module docstring)."""
    if w.dim() != 2 or not w.is_floating_point() or w.shape[1] % BLOCK:
        raise ValueError(f"NVFP4 quantises 2-D floating-point weights with in_features a multiple of {BLOCK}, got "
                         f"{w.dtype} {tuple(w.shape)}")
    wf = w.float()
    if not bool(torch.isfinite(wf).all()):
        raise ValueError(f"NVFP4 cannot quantise a weight {tuple(w.shape)} holding NaN or infinite values")
    scale = tensor_scale(wf)  # float32, 0-dim
    packed, scales = quantize_blocks(wf, scale)
    return NVFP4Weight(packed, swizzle_scales(scales), scale, tuple(w.shape))


def dequantize(packed: torch.Tensor, block_scales: torch.Tensor, tensor_scale: torch.Tensor,
               shape: tuple[int, int] | int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed [N, K/2], tiled block scales, tensor scale -> the weight [N, K] in `dtype`.

    `shape` is (N, K), or K alone. Computed in float32 as e2m1 * block scale * tensor scale, left to right: the
    first product is exact (2 by 4 significant bits), so the float32 value is the exact one rounded once, and the
    cast to `dtype` is the only other rounding."""
    n, k = (packed.shape[0], shape) if isinstance(shape, int) else shape
    check_shapes(packed, block_scales, tensor_scale, n, k)
    values = _table("pairs", packed.device)[packed.int()].view(n, k // BLOCK, BLOCK)  # float32 e2m1
    scales = unswizzle_scales(block_scales, n, k // BLOCK).float()  # [N, K/16]
    values.mul_(scales[..., None]).mul_(tensor_scale.float().reshape(()))
    return values.view(n, k).to(dtype)


def check_shapes(weight: torch.Tensor, block_scales: torch.Tensor, tensor_scale: torch.Tensor,
                 out_features: int, in_features: int, name: str = "NVFP4 weight") -> None:
    """Raise ValueError naming what is wrong when the three stored tensors cannot be a weight
    [out_features, in_features]; `name` (a layer's key) starts the message."""
    n, k = out_features, in_features
    if n < 1 or k < BLOCK or k % BLOCK:
        raise ValueError(f"{name}: in_features must be a positive multiple of {BLOCK} and out_features positive, "
                         f"got out_features={n}, in_features={k}")
    if weight.dtype != torch.uint8 or tuple(weight.shape) != (n, k // 2):
        raise ValueError(f"{name}: the packed weight should be uint8 [{n}, {k // 2}] (two 4-bit values a byte), "
                         f"got {weight.dtype} {list(weight.shape)}")
    rows, cols = scale_shape(n, k)
    if block_scales.dtype != E4M3 or tuple(block_scales.shape) != (rows, cols):
        raise ValueError(f"{name}: the block scales should be float8_e4m3fn [{rows}, {cols}] (one per {BLOCK} "
                         f"values, [{n}, {k // BLOCK}] padded to cuBLAS's 128 x 4 tiles), got {block_scales.dtype} "
                         f"{list(block_scales.shape)}")
    if tensor_scale.numel() != 1 or not tensor_scale.is_floating_point() or tensor_scale.dtype.itemsize < 2:
        raise ValueError(f"{name}: the tensor scale should be a single float32 value, got {tensor_scale.dtype} "
                         f"{list(tensor_scale.shape)}")
