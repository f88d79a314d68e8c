"""LoRAs on quantised weights: the low-rank branch against merging and re-quantising, and the branch's cost.

    python benchmarks/lora_cost.py [--res 1024] [--repeat 5]

On the tiny DiT (make-tiny's weights) with two random rank-4 LoRAs on three layers:
- error of the velocity of a fp8 / fp4 DiT with the LoRAs as a branch, and with the LoRAs merged into the dequantised
  weights and quantised again, both against the exact LoRA on the dequantised weights (fp32);
- median time of one denoising step with the LoRAs merged and as a branch (dense fp32), on this machine's device.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import kontext
from kontext.denoiser import Denoiser
from kontext.flux_loader import QUANTIZABLE
from kontext.lora.apply import with_loras
from kontext.ops import dense_state_dict
from kontext.quant import fp8, nvfp4

H = 128


def write_lora(path: Path, seed: int, layers: dict[str, tuple[int, int]]) -> None:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out_f, in_f) in layers.items():
        sd[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(out_f, 4, generator=g) * 0.1
        sd[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(4, in_f, generator=g) * 0.1
        sd[f"diffusion_model.{name}.alpha"] = torch.tensor(2.0)
    save_file(sd, path)


def velocity(dit, res: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    n = res // 8
    z, ref = torch.randn(1, 16, n, n, generator=g), torch.randn(1, 16, n, n, generator=g)
    with torch.no_grad():
        return Denoiser(dit, (n, n), [ref])(z, 0.6, torch.randn(1, 512, 64, generator=g),
                                            torch.randn(1, 64, generator=g), 2.5)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def requantised(dense, fmt: str):
    with torch.no_grad():
        for name, m in dense.named_modules():
            if isinstance(m, torch.nn.Linear) and name.startswith(QUANTIZABLE):
                w = m.weight.float()
                m.weight.copy_(fp8.dequantize(*fp8.quantize(w), torch.float32) if fmt == "fp8"
                               else nvfp4.quantize(w).dequantize(torch.float32))
    return dense


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = kontext.make_tiny(tmp / "models")
        write_lora(tmp / "a.safetensors", 1, {"double_blocks.0.img_attn.qkv": (3 * H, H),
                                              "single_blocks.1.linear2": (H, 5 * H)})
        write_lora(tmp / "b.safetensors", 2, {"double_blocks.0.img_attn.qkv": (3 * H, H),
                                              "double_blocks.1.txt_mlp.0": (4 * H, H)})
        loras = [(tmp / "a.safetensors", 0.8), (tmp / "b.safetensors", 0.6)]
        for fmt in ("fp8", "fp4"):
            q = kontext.load_dit(paths["dit"], precision=fmt)
            dense = kontext.FluxDiT(q.config)
            dense.load_state_dict({k: v.float() for k, v in dense_state_dict(q, torch.float32).items()})
            exact = velocity(with_loras(dense.eval(), loras), 256)
            merged = kontext.FluxDiT(q.config)
            merged.load_state_dict(dense_state_dict(with_loras(dense, loras), torch.float32))
            print(f"{fmt}: branch {rel(velocity(with_loras(q, loras), 256), exact):.1e}, merged and re-quantised "
                  f"{rel(velocity(requantised(merged.eval(), fmt), 256), exact):.1e} (max rel. error vs exact)")
        dit = kontext.load_dit(paths["dit"])
        for mode in ("merge", "branch"):
            model = with_loras(dit, loras, mode=mode)
            velocity(model, args.res)
            times = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                velocity(model, args.res)
                times.append(time.perf_counter() - t)
            print(f"{mode}: {statistics.median(times) * 1000:.0f} ms per step at {args.res}px with a reference")


if __name__ == "__main__":
    main()
