"""NVFP4 matmuls on Blackwell's FP4 tensor cores (W4A4), the fp4 counterpart of `fp8.scaled_mm_linear`.

Compute, chosen per layer and call by `choose_path` (a pure function, so the choice is testable without a GPU):
- "scaled_mm": compute capability >= 10.0 and a torch with `F.scaled_mm`'s two-level NVFP4 recipe (BlockWise1x16
  e4m3 block scales, swizzled, plus a TensorWise float32 scale per operand). The activation x [M, K] is quantised
  to NVFP4 at every call by the weights' own recipe (kontext.quant.nvfp4: a dynamic tensor scale amax / (6 * 448),
  e4m3 scales per 16 values along K, tiled as cuBLAS reads them), compiled into fused kernels as the fp8
  activations are; cuBLAS multiplies the two NVFP4 operands, accumulates in fp32 and applies both tensor scales.
  A file's static `input_scale` is not used: one scale per call follows the activations better.
- "_scaled_mm": the same with `torch._scaled_mm` (block scales only; older torch builds): the output is then
  multiplied by the product of the two tensor scales.
- "weight-only": everything else (the CPU, Ampere and Hopper, layers marked full precision, layers with a run-time
  weight function): the weight is dequantised to the compute dtype at use (W4A16), see kontext.ops.Fp4Linear.

Nibble order: our bytes hold element 2j in the high nibble (ComfyUI's and BFL's files), while torch's
float4_e2m1fn_x2 reads the low nibble first. Both operands are passed as they are, with the same in-byte order
along K, so the kernel sees the elements of every byte pair swapped in BOTH operands: the dot product is the same
sum in another order. A 16-value block is 8 whole bytes, so a swap never moves a value into a neighbouring block
and each value keeps its block scale. comfy_kitchen passes its high-nibble-first bytes to cuBLAS the same way.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import nvfp4
from .fused import Fused

log = logging.getLogger(__name__)

TWO_LEVEL, ONE_LEVEL, WEIGHT_ONLY = "scaled_mm", "_scaled_mm", "weight-only"
MIN_CAPABILITY = (10, 0)  # FP4 tensor cores: Blackwell (10.x data centre, 12.x consumer)
ROW_ALIGN = 16  # activation rows are zero padded to a multiple of 16, as comfy_kitchen pads them for cuBLAS
K_ALIGN, N_ALIGN = 32, 16  # torch's checks: K/2 packed bytes and N multiples of 16
FAILED_LABEL = "weight-only (W4A16) after a failed NVFP4 matmul"


@dataclass(frozen=True)
class Choice:
    """A compute path, the line that announces it (logged once per label), why, and whether it is a fallback on a
    GPU that should have served the fast path (a warning, not an info line)."""

    path: str
    label: str
    why: str
    fallback: bool = False


def choose_path(capability: tuple[int, int] | None, full_precision: bool, has_weight_function: bool,
                api: str | None, sides_ok: bool = True, kernel_failed: bool = False) -> Choice:
    """The path of an fp4 layer: `capability` of the input's CUDA device (None off CUDA), the layer's flags, the
    torch entry point (`torch_api()`), whether its sides suit the kernel, and whether a kernel failed already."""
    if capability is None:
        return Choice(WEIGHT_ONLY, "weight-only (W4A16)", "no FP4 tensor cores off CUDA: the weights are "
                      "dequantised per layer at use")
    cc = f"compute capability {capability[0]}.{capability[1]}"
    if tuple(capability) < MIN_CAPABILITY:
        return Choice(WEIGHT_ONLY, "weight-only (W4A16)", f"{cc}: FP4 tensor cores need 10.0 (Blackwell); the "
                      "weights are dequantised per layer at use")
    if full_precision:
        return Choice(WEIGHT_ONLY, "weight-only (W4A16) for full-precision layers",
                      "the file marks these layers full precision")
    if has_weight_function:
        return Choice(WEIGHT_ONLY, "weight-only (W4A16) for layers with a run-time weight function",
                      "a weight function (a LoRA the host patches in) applies to the dequantised weight")
    if kernel_failed:
        return Choice(WEIGHT_ONLY, FAILED_LABEL, "an NVFP4 matmul failed earlier in this process", fallback=True)
    if api is None:
        return Choice(WEIGHT_ONLY, "weight-only (W4A16) without an NVFP4 matmul in torch",
                      f"{cc}, but torch {torch.__version__} offers no NVFP4 scaled_mm", fallback=True)
    if not sides_ok:
        return Choice(WEIGHT_ONLY, "weight-only (W4A16) for layers of unsuitable sides",
                      f"NVFP4 matmuls need in_features a multiple of {K_ALIGN}, out_features of {N_ALIGN}",
                      fallback=True)
    return Choice(api, f"NVFP4 matmuls (W4A4, {api})", f"{cc}: FP4 tensor cores, activations quantised per call")


@functools.lru_cache(maxsize=None)  # asked by every fp4 layer at every call: once per device is enough
def capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


@functools.cache  # a property of this torch build
def torch_api() -> str | None:
    """The torch entry point for NVFP4 matmuls: F.scaled_mm with the two-level recipe, else torch._scaled_mm."""
    if not hasattr(torch, "float4_e2m1fn_x2"):
        return None
    scaling, swizzle = getattr(F, "ScalingType", None), getattr(F, "SwizzleType", None)
    if hasattr(F, "scaled_mm") and hasattr(scaling, "BlockWise1x16") and hasattr(swizzle, "SWIZZLE_32_4_4"):
        return TWO_LEVEL
    return ONE_LEVEL if hasattr(torch, "_scaled_mm") else None


_failed: str | None = None  # why the kernel failed: from then on every fp4 layer of the process is weight-only


def kernel_failed() -> bool:
    return _failed is not None


def mark_failed(reason: str) -> None:
    global _failed
    _failed = reason


# ---------------------------------------------------------------- activations

def _quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (packed uint8 [roundup(M, 16), K/2], e4m3 block scales [roundup(M, 128), roundup(K/16, 4)]
    tiled, float32 tensor scale 0-dim): the weights' recipe (nvfp4.quantize_blocks), with a dynamic tensor scale.

    The padded rows are zeros: they leave the tensor scale alone and get zero scales and codes."""
    xf = F.pad(x.float(), (0, 0, 0, -x.shape[0] % ROW_ALIGN))
    scale = nvfp4.tensor_scale(xf)
    packed, block_scales = nvfp4.quantize_blocks(xf, scale)
    # Tiled as bytes: inductor cannot yet pad float8 values (it promotes the mask with them), and bytes are exact.
    tiled = nvfp4.swizzle_scales(block_scales.view(torch.uint8)).view(nvfp4.E4M3)
    return packed, tiled, scale


# `_quantize_activation` compiled once (dynamic in M) into fused kernels on CUDA; eager elsewhere and where
# compiling fails (unfused, the quantisation would cost more than the matmul saves).
quantize_activation = Fused(_quantize_activation, "fp4 activation quantisation")


# ---------------------------------------------------------------- the matmul

def nvfp4_mm(a: tuple[torch.Tensor, torch.Tensor, torch.Tensor], w: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
             out_dtype: torch.dtype, bias: torch.Tensor | None, api: str) -> torch.Tensor:
    """a = (packed [M, K/2], tiled block scales, tensor scale), w likewise [N, K/2] -> a @ w^T [M, N] in out_dtype.

    `bias` (out_dtype, bf16/fp16 only) is added by the kernel's epilogue on the two-level path, afterwards on the
    other (where the product is rescaled first)."""
    # Both operands keep our high-nibble-first bytes: the swap cancels in the dot product (module docstring).
    a4, w4 = a[0].view(torch.float4_e2m1fn_x2), w[0].view(torch.float4_e2m1fn_x2).t()  # w4: [K/2, N] col-major
    if api == TWO_LEVEL:
        s, z = F.ScalingType, F.SwizzleType
        # Two scales per operand, two swizzle entries each (torch's C++ check wants one per scale).
        return F.scaled_mm(a4, w4, scale_a=[a[1].reshape(-1), a[2].float()],
                           scale_recipe_a=[s.BlockWise1x16, s.TensorWise],
                           scale_b=[w[1].reshape(-1), w[2].float()], scale_recipe_b=[s.BlockWise1x16, s.TensorWise],
                           swizzle_a=[z.SWIZZLE_32_4_4, z.NO_SWIZZLE], swizzle_b=[z.SWIZZLE_32_4_4, z.NO_SWIZZLE],
                           bias=bias, output_dtype=out_dtype)
    # bf16 out: the product before the tensor scales reaches K * (6 * 448)^2, beyond fp16's range.
    out = torch._scaled_mm(a4, w4, a[1].reshape(-1), w[1].reshape(-1), out_dtype=torch.bfloat16)
    out = (out.float() * (a[2].float() * w[2].float())).to(out_dtype)
    return out if bias is None else out + bias


def fp4_linear(x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               bias: torch.Tensor | None, api: str) -> torch.Tensor:
    """x [..., K] @ W^T + bias -> [..., N] in x's dtype, W = (packed [N, K/2], tiled block scales, tensor scale)
    on x's device, bias in x's dtype or None."""
    shape, n = x.shape, weight[0].shape[0]
    x2 = x.reshape(-1, shape[-1])
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16  # the kernel's outputs
    fused = bias if out_dtype == x.dtype else None  # a float32 bias joins the float32 output, not the kernel
    out = nvfp4_mm(quantize_activation(x2), weight, out_dtype, fused, api)[: x2.shape[0]].to(x.dtype)
    if bias is not None and fused is None:
        out = out + bias
    return out.reshape(*shape[:-1], n)
