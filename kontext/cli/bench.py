"""The `bench` verb: `python -m kontext bench [--size full|tiny] [--device D] [--paths bf16,fp8,fp4]
[--modes resident,stream,compiled] [--memory-limit-gb X] [--cuda-graphs] [--step-only] [--res N] [--steps N]
[--repeat N] [--warmup N] [--comfyui DIR] [--json FILE]`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time the DiT per precision on random weights, against diffusers and ComfyUI",
                       description="Time one denoising step and a whole edit at each precision on a DiT with random "
                                   "weights built on the device (no download), with diffusers' and ComfyUI's Flux "
                                   "on the same weights in the same process.")
    p.add_argument("--size", choices=("full", "tiny"), default="full",
                   help="full: FLUX.1 Kontext [dev] (12B, needs a GPU); tiny: the test size (default: %(default)s)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available, else cpu)")
    p.add_argument("--paths", default="bf16,fp8,fp4",
                   help="comma-separated precisions to time, of bf16, fp8, fp4; on the CPU fp32 stands in for bf16 "
                        "and fp8/fp4 run weight-only (default: %(default)s)")
    p.add_argument("--modes", default=None,
                   help="comma-separated memory modes, of resident (every weight on the device), stream (the blocks "
                        "streamed from pinned CPU memory, next one prefetched), compiled (resident, blocks compiled; "
                        "its warm-up is the compile); run in that order (default: all three on a GPU; resident,stream "
                        "on the CPU, where stream is a CPU-to-CPU stand-in and compiling takes ~30 s a path)")
    p.add_argument("--memory-limit-gb", type=float, default=None, metavar="X",
                   help="cap PyTorch's CUDA allocator at X GiB (torch.cuda.set_per_process_memory_fraction) to "
                        "emulate a smaller card, e.g. 16 or 8; a row that does not fit says 'OOM at X GB' (GPU only)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="the compiled mode also records CUDA graphs (torch.compile mode reduce-overhead; GPU only)")
    p.add_argument("--step-only", action="store_true", help="time the step only, not a whole edit")
    p.add_argument("--res", type=int, default=None,
                   help="square edit size in pixels, one reference of the same size (default: 1024 full, 256 tiny)")
    p.add_argument("--steps", type=int, default=None, help="steps of the timed whole edit (default: 28 full, 4 tiny)")
    p.add_argument("--repeat", type=int, default=10, help="timed calls per step measurement (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before them (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default: %(default)s)")
    p.add_argument("--comfyui", type=Path, default=None, metavar="DIR",
                   help="a ComfyUI checkout: also time its own Flux model on the same weights")
    p.add_argument("--json", type=Path, default=None, metavar="FILE",
                   help="write every number to FILE (rewritten after each row: a run cut short keeps its rows)")
    p.set_defaults(run=run)


def check_numbers(args) -> None:
    from ..errors import InputError

    for flag in ("repeat", "steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise InputError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if args.warmup < 0:
        raise InputError(f"--warmup {args.warmup}: must be 0 or more")


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError

    check_numbers(args)
    json_path = args.json.expanduser() if args.json is not None else None
    if json_path is not None and not json_path.parent.is_dir():
        raise InputError(f"--json {json_path}: the folder {json_path.parent} does not exist")

    import torch  # after the checks: a typo should not wait for torch to import

    from ..bench import (SIZES, Setup, bench, check_cuda_graphs, check_memory_limit, check_modes, check_paths,
                         check_res, render)
    from ..weights.loading import as_device

    paths = check_paths(args.paths)
    make_config, res, steps = SIZES[args.size]
    res = args.res if args.res is not None else res
    check_res(res)
    device = as_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    modes = check_modes(args.modes, device)
    check_memory_limit(args.memory_limit_gb, device)
    check_cuda_graphs(args.cuda_graphs, modes, device)
    setup = Setup(make_config(), device, res, args.steps or steps, args.warmup, args.repeat, args.seed,
                  memory_limit_gb=args.memory_limit_gb, cuda_graphs=args.cuda_graphs, step_only=args.step_only)
    comfy_dir = args.comfyui.expanduser() if args.comfyui is not None else None
    write = (lambda result: json_path.write_text(json.dumps(result, indent=2))) if json_path is not None else None
    result = bench(setup, paths, comfy_dir, args.size, modes, progress=write)
    print(render(result))
    if write is not None:
        write(result)  # also when no row ran (its meta and peers)
        print(f"wrote {json_path}")
    return 0
