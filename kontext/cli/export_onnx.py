"""The `export-onnx` verb (a DiT file -> an ONNX graph for TensorRT; `build-engine` turns it into an engine).

    python -m kontext export-onnx --dit flux1-kontext-dev.safetensors --out kontext.onnx [--precision bf16|fp8|fp4]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .common import check_loras, lora_spec, user_path


def add_parser(sub) -> None:
    p = sub.add_parser("export-onnx", help="export the DiT as an ONNX graph for TensorRT",
                       description="Export the DiT (Kontext's dynamic token axis: the target alone or with one or "
                                   "two references at every preferred resolution; 256 to 512 text tokens) as ONNX, "
                                   "weights beside it past 2 GB, fp8/fp4 weights as DequantizeLinear nodes.")
    p.add_argument("--dit", type=user_path, required=True, help="the DiT file (any layout `edit --dit` reads)")
    p.add_argument("--out", type=user_path, required=True, help="the .onnx file to write")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32", "fp8", "fp4"), default=None,
                   help="weights and compute of the graph (default: as the file stores them, computing in bf16)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="merge this LoRA into the graph (repeatable): an engine's weights are fixed once built")
    p.add_argument("--max-references", type=int, default=2, help="references the graph serves (default: 2)")
    p.add_argument("--max-batch", type=int, default=2, help="largest batch (default: 2, true CFG in one call)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and its .data file) if they exist")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..errors import InputError
    from ..flux_loader import load_dit
    from ..precision import DENSE
    from ..tensorrt.export import check_output, export_onnx
    from ..tensorrt.profiles import kontext_profiles

    out: Path = args.out
    if out.suffix.lower() != ".onnx":
        raise InputError(f"--out {out}: the output must be a .onnx file")
    check_output(out, out.with_name(out.name + ".data"), args.overwrite)
    if not args.dit.exists():
        raise InputError(f"--dit {args.dit}: no such file or folder")
    loras = [lora_spec(text) for text in args.lora]
    check_loras(loras)
    profiles = kontext_profiles(args.max_references, args.max_batch)
    dtype = DENSE.get(args.precision, torch.bfloat16)  # quantised graphs compute in bf16
    t0 = time.perf_counter()
    dit = load_dit(args.dit, device="cpu", dtype=dtype, precision=args.precision, loras=loras)
    done = export_onnx(dit, out, profiles=profiles, source=args.dit,
                       loras=loras, overwrite=args.overwrite)
    data = f" + {done.data_path.name}" if done.data_path else ""
    print(f"wrote {out}{data} ({done.precision}, opset {done.opset}, {done.bytes / 1e9:.2f} GB) in "
          f"{time.perf_counter() - t0:.0f}s (export {done.seconds:.0f}s)")
    return 0
