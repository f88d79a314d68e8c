"""The `build-engine` verb: a graph written by export-onnx -> a TensorRT engine and its JSON sidecar.

    python -m kontext build-engine --onnx kontext.onnx --out ~/ComfyUI/models/tensorrt
"""
from __future__ import annotations

import argparse
import time

from .common import user_path


def add_parser(sub) -> None:
    p = sub.add_parser("build-engine", help="build a TensorRT engine from an exported graph (needs tensorrt)",
                       description="Build a strongly typed TensorRT engine with one optimisation profile per "
                                   "reference count, a timing cache, and a JSON sidecar (source hash, precision, "
                                   "profiles, TensorRT version, GPU).")
    p.add_argument("--onnx", type=user_path, required=True, help="the graph written by export-onnx")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=user_path, help="the engine folder; engines for other GPUs, TensorRT versions "
                                                       "or models live side by side in it")
    where.add_argument("--comfyui", type=user_path, metavar="DIR",
                       help="a ComfyUI folder: the engine goes to its models/tensorrt, where the loader node finds it")
    p.add_argument("--workspace-gb", type=float, default=None, help="TensorRT's workspace limit in GB")
    p.add_argument("--refittable", action="store_true", help="build with TensorRT's REFIT flag")
    p.add_argument("--rebuild", action="store_true", help="build again even if the cache has this engine")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..tensorrt.build import build_engine

    if args.workspace_gb is not None and not args.workspace_gb > 0:
        raise InputError(f"--workspace-gb must be positive, got {args.workspace_gb}")
    out = args.out
    if args.comfyui is not None:
        if not (args.comfyui / "models").is_dir():
            raise InputError(f"--comfyui {args.comfyui}: not a ComfyUI folder (it has no models/ folder)")
        out = args.comfyui / "models" / "tensorrt"
    t0 = time.perf_counter()
    plan = build_engine(args.onnx, out, refittable=args.refittable, workspace_gb=args.workspace_gb,
                        rebuild=args.rebuild, verbose=args.verbose)
    print(f"engine {plan} ({plan.stat().st_size / 1e9:.2f} GB) ready in {time.perf_counter() - t0:.0f}s")
    return 0
