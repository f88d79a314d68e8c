"""The `quantize` verb: `python -m kontext quantize --dit IN --out OUT --precision fp8|fp4 [--overwrite]`."""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="write a DiT as fp8 or NVFP4 in ComfyUI's mixed-precision layout",
                       description="Quantise a Kontext DiT to fp8 or fp4 (NVFP4), streaming tensor by tensor; the "
                                   "file loads in ComfyUI's UNETLoader and in this pack.")
    p.add_argument("--dit", type=Path, required=True,
                   help="the DiT to quantise: flux1-kontext-dev.safetensors, a diffusers folder, or any layout "
                        "`edit --dit` reads")
    p.add_argument("--out", type=Path, required=True, help="the .safetensors file to write (ComfyUI's mixed layout)")
    p.add_argument("--precision", choices=("fp8", "fp4"), required=True,
                   help="fp8: float8 e4m3 with a scale per tensor (about 12 GB at full size); fp4: NVFP4 (about "
                        "7 GB)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..quant.writer import quantize_file

    out: Path = args.out.expanduser()
    if out.suffix.lower() != ".safetensors":
        raise InputError(f"--out {out}: the output must be a .safetensors file")
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; give a file name such as {out / 'kontext-fp8.safetensors'}")
    if out.exists() and not args.overwrite:
        raise InputError(f"--out {out} exists; pass --overwrite to replace it")
    t0 = time.perf_counter()
    quantize_file(args.dit, out, args.precision, overwrite=args.overwrite)
    print(f"wrote {out} ({args.precision}, {out.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f}s")
    return 0
