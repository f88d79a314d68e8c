"""One denoising step of a FLUX.1 Kontext edit at each precision: time, memory, weight bytes and error against fp32.

    python benchmarks/precision_step.py [--size full|tiny] [--device cuda] [--paths bf16,fp8,fp4]
                                        [--warmup 3] [--repeat 10] [--res 1024]

`full` builds FLUX.1 Kontext [dev] (12B) with random weights made directly on the device (no checkpoint needed; the
fp32 reference alone takes 48 GB, so it needs a GPU of 80 GB or more);
`tiny` runs the same steps on FluxConfig.tiny() with a 256px edit, on the CPU or a GPU, to check the script itself.
The edit is one target and one reference of res x res pixels and 512 text tokens (at 1024px: 4096 + 4096 + 512).

Every path gets the same weights: each parameter is drawn from its own seeded generator, so a path re-draws the
fp32 values it needs layer by layer (and rounds or quantises them) instead of holding the 48 GB fp32 model next to
its own. Paths, one at a time:
- fp32: the reference, dense fp32 with TF32 off; one call (not timed with warm-up);
- bf16: every weight rounded to bf16, computing in bf16;
- fp8 / fp4: the linear layers of the transformer blocks (kontext.flux_loader.QUANTIZABLE) quantised from fp32 as
  the loader quantises on load (fp8 per row, NVFP4), the rest dense bf16, computing in bf16.
Per path: median ms per `Denoiser` call over `--repeat` calls after `--warmup` (CUDA events on a GPU), rotating among
fresh random inputs; peak memory (reset before the path's build); resident weight bytes, measured and as
`resident_bytes` predicts; error of the velocity against fp32 on the same inputs, ||out - ref|| / ||ref|| and
max |out - ref| / max |ref|. The table is printed last; with $OUT set, all numbers go to $OUT/precision_step.json
(rewritten after each path, so a run cut short keeps what it measured).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import torch

from kontext.config import FluxConfig
from kontext.denoiser import Denoiser
from kontext.dit import FluxDiT
from kontext.bench.core import parameter_bytes, quantized_tensors
from kontext.flux_loader import quantized_formats, resident_bytes
from kontext.ops import Fp4Linear, Fp8Linear, linear_formats, set_formats
from kontext.quant import fp8
from kontext.weights.loading import set_parameter

SIZES = {"tiny": (FluxConfig.tiny, 256), "full": (FluxConfig.kontext_dev, 1024)}
PATHS = ("bf16", "fp8", "fp4")
TEXT_TOKENS = 512
SIGMA, GUIDANCE = 0.7, 2.5
INPUT_SETS = 3  # timed calls rotate among these, so no call re-reads the previous call's inputs
FP8_TARGET = 5e-2  # relative error of the fp8 step against fp32 we accept


# ---------------------------------------------------------------- weights

class Weights:
    """The random fp32 value of every DiT parameter, re-drawable one at a time: parameter i comes from its own
    generator seeded with (seed, i), so every path sees the same numbers without keeping them all."""

    def __init__(self, config: FluxConfig, device: torch.device, seed: int = 0):
        with torch.device("meta"):
            dense = FluxDiT(config)
        self.shapes = {n: tuple(p.shape) for n, p in dense.named_parameters()}
        self.index = {n: i for i, n in enumerate(self.shapes)}
        self.config, self.device, self.seed = config, device, seed

    def draw(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + self.index[name])
        t = torch.randn(shape, generator=g, device=self.device)
        if name.endswith(".scale"):  # RMSNorm gains around 1
            return t.mul_(0.1).add_(1.0)
        if name.endswith(".bias"):
            return t.mul_(0.02)
        if len(shape) != 2:
            raise ValueError(f"{name}: no init rule for a parameter of shape {shape}")
        return t.div_(math.sqrt(shape[1]))  # 1/sqrt(fan_in): activations keep their size through the layers


def build(weights: Weights, path: str) -> FluxDiT:
    """The DiT for one path, materialised layer by layer on the device (never a full fp32 copy beside it).

    Built on `meta` first, quantised layers swapped in there by `set_formats` (as the loader does), then every
    parameter drawn: dense ones rounded to the compute dtype, quantised weights made from their fp32 values, scales
    kept in float32."""
    dtype = torch.float32 if path == "fp32" else torch.bfloat16
    with torch.device("meta"):
        model = FluxDiT(weights.config, dtype=dtype)
    if path in ("fp8", "fp4"):
        set_formats(model, quantized_formats(model, path))
    for name, module in model.named_modules():
        if isinstance(module, (Fp8Linear, Fp4Linear)):
            for leaf, t in quantized_tensors(weights.draw(f"{name}.weight"), module.fmt).items():
                set_parameter(model, f"{name}.{leaf}", t)
    for name, p in list(model.named_parameters()):
        if p.is_meta:  # dense weights and biases, the quantised layers' biases too
            set_parameter(model, name, weights.draw(name).to(dtype))
    return model.eval()


# ---------------------------------------------------------------- inputs and calls

@dataclass
class Inputs:
    z: torch.Tensor  # model-space target latent [1, 16, h, w]
    txt: torch.Tensor  # [1, 512, context_in_dim]
    pooled: torch.Tensor  # [1, vec_in_dim]


def make_inputs(config: FluxConfig, latent: int, device: torch.device, seed: int) -> tuple[list[Inputs], torch.Tensor]:
    """INPUT_SETS fresh random input sets and one raw reference latent (fixed for a run, as in a real edit)."""
    g = torch.Generator(device=device).manual_seed(10_000 + seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, device=device)
    sets = [Inputs(rnd(1, 16, latent, latent), rnd(1, TEXT_TOKENS, config.context_in_dim), rnd(1, config.vec_in_dim))
            for _ in range(INPUT_SETS)]
    return sets, rnd(1, 16, latent, latent)


def median_ms(step: Callable[[int], torch.Tensor], warmup: int, repeat: int,
              device: torch.device) -> tuple[float, list[float]]:
    """Median milliseconds of `repeat` calls step(i) after `warmup` untimed ones; CUDA events on a GPU."""
    for i in range(warmup):
        step(i)
    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeat)]
        for i, (start, end) in enumerate(events):
            start.record()
            step(warmup + i)
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for i in range(repeat):
            t = time.perf_counter()
            step(warmup + i)
            times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), times


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    d = (out.float() - ref.float())
    return {"rel_err": float(d.norm() / ref.norm()), "max_err": float(d.abs().max() / ref.abs().max()),
            "finite": bool(torch.isfinite(out).all())}


# ---------------------------------------------------------------- one path

@dataclass
class Run:
    config: FluxConfig
    device: torch.device
    latent: int
    warmup: int
    repeat: int
    weights: Weights
    inputs: list[Inputs]
    ref_raw: torch.Tensor


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


@torch.no_grad()
def run_path(run: Run, path: str, ref: torch.Tensor | None, bf16_out: torch.Tensor | None) -> dict:
    """Build the path's model, take its step on input set 0 (for the error) and time it; free it on return."""
    reset_memory(run.device)
    t0 = time.perf_counter()
    model = build(run.weights, path)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    res: dict = {"build_s": time.perf_counter() - t0, "weight_bytes": parameter_bytes(model),
                 "weight_bytes_expected": resident_bytes(run.config, path),
                 "linear_formats": linear_formats(model)}
    den = Denoiser(model, (run.latent, run.latent), [run.ref_raw], "offset", run.device)
    step = lambda i: den(run.inputs[i % INPUT_SETS].z, SIGMA, run.inputs[i % INPUT_SETS].txt,
                         run.inputs[i % INPUT_SETS].pooled, GUIDANCE)
    if path == "fp32":  # the reference: one call is all the comparison needs (a 12B fp32 step takes seconds)
        t0 = time.perf_counter()
        out = step(0)
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        res["one_call_ms"] = (time.perf_counter() - t0) * 1000
    else:
        out = step(0)  # also the first warm-up call
        res["ms"], res["times_ms"] = median_ms(step, max(run.warmup - 1, 0), run.repeat, run.device)
        if ref is not None:
            res.update(errors(out, ref))
        if bf16_out is not None and path != "bf16":
            res["rel_err_vs_bf16"] = errors(out, bf16_out)["rel_err"]
    fp8_paths = sorted({m._path or "weight-only" for m in model.modules() if isinstance(m, Fp8Linear)})
    if fp8_paths:
        res["fp8_compute"] = ",".join(fp8_paths)
    res["peak_bytes"] = peak_bytes(run.device)
    res["out"] = out
    return res


# ---------------------------------------------------------------- report

def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.2f} {unit}" if unit == "GiB" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def compute_path(path: str, r: dict) -> str:
    return {"fp32": "fp32, TF32 off", "bf16": "bf16", "fp4": "weight-only (W4A16)"}.get(path) or \
        r.get("fp8_compute", "?")


def table(results: dict[str, dict], header: str) -> str:
    rows = [header, (f"{'path':5} {'ms/step':>9} {'peak mem':>10} {'weights':>10} {'expected':>10} "
                     f"{'rel err':>9} {'max err':>9}  compute")]
    for path, r in results.items():
        if "error" in r:
            rows.append(f"{path:5} FAILED: {r['error']}")
            continue
        ms = f"{r['one_call_ms']:.1f}*" if path == "fp32" else f"{r['ms']:.1f}"
        peak = "-" if r["peak_bytes"] is None else size(r["peak_bytes"])
        rel = f"{r['rel_err']:.2e}" if "rel_err" in r else ("ref" if path == "fp32" else "-")
        mx = f"{r['max_err']:.2e}" if "max_err" in r else "-"
        rows.append(f"{path:5} {ms:>9} {peak:>10} {size(r['weight_bytes']):>10} "
                    f"{size(r['weight_bytes_expected']):>10} {rel:>9} {mx:>9}  {compute_path(path, r)}")
    rows.append("* fp32: the reference, one call without warm-up. Errors: ||out - ref|| / ||ref|| and "
                "max |out - ref| / max |ref| against it")
    fp8r = results.get("fp8", {})
    if "rel_err" in fp8r:
        verdict = "PASS" if fp8r["rel_err"] <= FP8_TARGET and fp8r["finite"] else "FAIL"
        rows.append(f"fp8 rel err {fp8r['rel_err']:.2e} against the target {FP8_TARGET:.0e}: {verdict}")
    return "\n".join(rows)


def write_json(path: Path | None, meta: dict, results: dict[str, dict]) -> None:
    if path is not None:
        clean = {k: {kk: vv for kk, vv in v.items() if kk != "out"} for k, v in results.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**meta, "paths": clean}, indent=2))


def environment(device: torch.device, config: FluxConfig, res: int, latent: int, args) -> dict:
    meta = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device), "size": args.size,
            "config": json.loads(config.to_json()), "res": res, "warmup": args.warmup, "repeat": args.repeat,
            "tokens": {"target": (latent // 2) ** 2, "reference": (latent // 2) ** 2, "text": TEXT_TOKENS},
            "sigma": SIGMA, "guidance": GUIDANCE, "tf32": torch.backends.cuda.matmul.allow_tf32}
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
        meta["capability"] = list(torch.cuda.get_device_capability(device))
        meta["fp8_tensor_cores"] = fp8.scaled_mm_supported(device)
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=SIZES, default="full")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated, of " + ", ".join(PATHS))
    ap.add_argument("--res", type=int, default=None, help="edit size in pixels (default 1024 full, 256 tiny)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stdout)
    logging.getLogger("kontext").setLevel(logging.INFO)  # kontext.ops says which compute path fp8/fp4 take
    # The reference must be true fp32: matmuls on TF32 would put its own error (~3e-4) into every comparison.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    make_config, default_res = SIZES[args.size]
    config, device = make_config(), torch.device(args.device)
    res = args.res or default_res
    latent = res // 8
    paths = [p for p in args.paths.split(",") if p]
    unknown = set(paths) - set(PATHS)
    if unknown:
        ap.error(f"unknown paths {sorted(unknown)}; expected some of {', '.join(PATHS)}")
    weights = Weights(config, device, args.seed)
    inputs, ref_raw = make_inputs(config, latent, device, args.seed)
    run = Run(config, device, latent, args.warmup, args.repeat, weights, inputs, ref_raw)
    meta = environment(device, config, res, latent, args)
    out_dir = os.environ.get("OUT")
    json_path = Path(out_dir) / "precision_step.json" if out_dir else None

    results: dict[str, dict] = {}
    for path in ["fp32", *paths]:
        ref = results.get("fp32", {}).get("out")
        bf16_out = results.get("bf16", {}).get("out")
        try:
            results[path] = run_path(run, path, ref, bf16_out)
            r = results[path]
            ms = r.get("ms", r.get("one_call_ms"))
            peak = "" if r["peak_bytes"] is None else f", peak {size(r['peak_bytes'])}"
            err = f", rel err {r['rel_err']:.2e}" if "rel_err" in r else ""
            print(f"{path}: {ms:.1f} ms, built in {r['build_s']:.1f} s{peak}{err}", flush=True)
        except Exception as exc:  # one path failing (OOM, a missing kernel) must not lose the others
            results[path] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            print(f"{path}: FAILED {results[path]['error']}", flush=True)
        write_json(json_path, meta, results)
    reset_memory(device)

    header = (f"precision_step {args.size} on {meta.get('gpu', device)} (torch {torch.__version__}): {res}x{res} "
              f"edit, {meta['tokens']['target']} target + {meta['tokens']['reference']} reference + {TEXT_TOKENS} "
              f"text tokens; median of {args.repeat} calls after {args.warmup} warm-up")
    print(table(results, header))


if __name__ == "__main__":
    main()
