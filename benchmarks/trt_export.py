"""Time `export-onnx` on a full-width DiT: file size, export time and peak RAM.

Writes a random DiT in BFL's layout (bf16, streamed tensor by tensor, so a 24 GB file needs little RAM), optionally
quantises it with `python -m kontext quantize`, then runs `python -m kontext export-onnx` on it under
/usr/bin/time, and prints one JSON line per step. Full size (19 + 38 blocks) needs about 24 GB of disk for the bf16
file, 12 GB for the fp8 one and as much again for the graph; `--blocks 2 2` makes a full-width model with fewer
blocks.

    python benchmarks/trt_export.py --dir /tmp/full --precision fp8            # the full-size fp8 export
    python benchmarks/trt_export.py --dir /tmp/small --blocks 2 2 --precision bf16
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from kontext.config import FluxConfig
from kontext.dit import FluxDiT

DTYPE = {torch.bfloat16: "BF16", torch.float32: "F32"}


def write_random_dit(path: Path, config: FluxConfig, seed: int = 0) -> None:
    """A safetensors file of random weights with FluxDiT's parameter names (BFL's layout), one tensor at a time."""
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in FluxDiT(config).named_parameters()}
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in shapes.items():
            # Scaled like trained weights (~1/sqrt(fan-in)); norms' scales near 1 so activations stay finite.
            std = 1.0 / max(shape[-1], 1) ** 0.5 if len(shape) > 1 else 0.02
            t = torch.randn(shape, generator=g) * std
            if name.endswith(".scale"):
                t = t + 1
            f.write(t.to(torch.bfloat16).view(torch.uint8).numpy().tobytes())


def timed(cmd: list[str]) -> dict:
    """Run `cmd` under /usr/bin/time -v: wall seconds, peak RSS (GB), its last output line."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_gb": round(rss / 1e6, 2),
            "said": done.stdout.strip().splitlines()[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--blocks", type=int, nargs=2, default=None, metavar=("DOUBLE", "SINGLE"))
    ap.add_argument("--precision", choices=("bf16", "fp8", "fp4"), default="bf16")
    args = ap.parse_args()
    config = FluxConfig.kontext_dev()
    if args.blocks:
        config.depth, config.depth_single_blocks = args.blocks
    args.dir.mkdir(parents=True, exist_ok=True)
    tag = f"{config.depth}x{config.depth_single_blocks}"
    dense = args.dir / f"kontext-{tag}-bf16.safetensors"
    if not dense.exists():
        start = time.perf_counter()
        write_random_dit(dense, config)
        print(json.dumps({"step": "write bf16", "gb": round(dense.stat().st_size / 1e9, 2),
                          "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    source = dense
    if args.precision != "bf16":
        source = args.dir / f"kontext-{tag}-{args.precision}.safetensors"
        if not source.exists():
            r = timed([sys.executable, "-m", "kontext", "quantize", "--dit", str(dense), "--out", str(source),
                       "--precision", args.precision])
            print(json.dumps({"step": f"quantize {args.precision}", **r}), flush=True)
    out = args.dir / f"kontext-{tag}-{args.precision}.onnx"
    r = timed([sys.executable, "-m", "kontext", "export-onnx", "--dit", str(source), "--out", str(out),
               "--overwrite"])
    data = out.with_name(out.name + ".data")
    size = out.stat().st_size + (data.stat().st_size if data.exists() else 0)
    print(json.dumps({"step": f"export-onnx {args.precision}", "blocks": tag, "onnx_gb": round(size / 1e9, 2),
                      "torch": torch.__version__, **r}), flush=True)


if __name__ == "__main__":
    main()
