"""Peak resident memory while loading a synthetic >= 1 GB Flux DiT checkpoint (BFL layout, bf16).

    python benchmarks/load_memory.py [--hidden 1024 --depth 8 --single 16] [--keep FILE]

Each measurement runs in a fresh subprocess and reports its peak RSS (VmHWM, reset at start) against the checkpoint's size:
- "stream": read every tensor through the streaming reader and drop it (what a GPU load costs in host RAM);
- "load-cpu-bf16": load_dit onto the CPU in bf16 (the model itself stays resident, so peak >= file size);
- "load-cpu-fp8", "load-cpu-fp4": load_dit quantising on load (the quantised model stays resident);
- "quantize-fp8", "quantize-fp4": `python -m kontext quantize`'s writer, streaming tensor by tensor.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import sys, time, torch, json
from kontext.weights import Checkpoint
from kontext.flux_loader import load_dit
path, mode = sys.argv[1], sys.argv[2]
def hwm():  # peak RSS in kB since the last reset
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
open("/proc/self/clear_refs", "w").write("5")  # reset the peak: ru_maxrss would carry the parent's
base = hwm()
t0 = time.perf_counter()
if mode.startswith("quantize-"):
    from kontext.quant.writer import quantize_file
    quantize_file(path, path + "." + mode, mode.split("-")[1], overwrite=True)
    largest = 0
elif mode.startswith("load-cpu-fp"):
    m = load_dit(path, dtype=torch.bfloat16, precision=mode.rsplit("-", 1)[1])
    largest = 0
elif mode == "stream":
    ck = Checkpoint(path)
    largest = 0
    for k in ck.weight_keys():
        t = ck.read(k).to(torch.bfloat16)
        largest = max(largest, t.numel() * t.element_size())
        del t
else:
    m = load_dit(path, dtype=torch.bfloat16)
    largest = 0
dt = time.perf_counter() - t0
peak = hwm()
print(json.dumps({"baseline_mb": base / 1024, "peak_mb": peak / 1024, "seconds": dt, "largest_tensor_mb": largest / 2**20}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--single", type=int, default=16)
    args = ap.parse_args()
    import torch
    from safetensors.torch import save_file

    from kontext.config import FluxConfig
    from kontext.dit import FluxDiT

    cfg = FluxConfig(hidden_size=args.hidden, num_heads=args.hidden // 128, depth=args.depth,
                     depth_single_blocks=args.single)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic-flux.safetensors"
        with torch.device("meta"):
            shapes = {n: p.shape for n, p in FluxDiT(cfg).named_parameters()}
        # Write in pieces so the writer itself does not need the whole model in RAM twice.
        state = {n: torch.full(s, 0.01, dtype=torch.bfloat16) for n, s in shapes.items()}
        save_file(state, str(path))
        del state
        size_mb = path.stat().st_size / 2**20
        results = {"file_mb": size_mb}
        for mode in ("stream", "load-cpu-bf16", "load-cpu-fp8", "load-cpu-fp4", "quantize-fp8", "quantize-fp4"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], capture_output=True, text=True,
                                 check=True).stdout
            results[mode] = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
