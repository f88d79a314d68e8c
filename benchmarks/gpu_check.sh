#!/usr/bin/env bash
# One call on a lent GPU machine (H100/H200, 80 GB or more) that builds, checks accuracy and times every path.
# Every model is built with random weights directly on the GPU (seconds; no checkpoint). Parts, each with its own
# timeout so that one running long costs only itself (about 8 minutes in all at most):
#   1. GPU tests (tests/test_gpu.py)                                                                       60 s
#   2. one step at bf16, fp8, fp4 against fp32, full size (benchmarks/precision_step.py): accuracy, step time and
#      memory; the fp32 reference alone is 48 GB                                                          100 s
#   3. `python3 -m kontext bench --size full`: bf16/fp8/fp4 x resident/stream/compiled, per row a step (median of
#      3), its warm-up (the compile, for compiled), an 8-step edit, peak memory, weight bytes on the GPU, the
#      velocity against the resident mode's; diffusers' FluxTransformer2DModel on the same weights          220 s
#   4. small cards, step only: fp8 resident under a 16 GB cap                                              45 s
#      bf16 and fp4, resident and streamed, under an 8 GB cap (bf16 resident is expected to say OOM)         65 s
# (torch.cuda.set_per_process_memory_fraction caps PyTorch's allocator; the CUDA context is outside the cap.)
# Output: everything tee'd to $OUT/gpu_check.log; numbers in $OUT/precision_step.json, $OUT/bench.json,
# $OUT/bench_16gb.json, $OUT/bench_8gb.json (the bench files are rewritten after each row: a part cut short by its
# timeout keeps the rows it measured). ComfyUI is not on that machine. It has torch, triton, pytest, einops,
# safetensors and transformers but no diffusers: carry its pure-Python wheel, or the peer timing is skipped.
# Here, once:
#   echo /.whl/ >> .git/info/exclude; pip download --no-deps diffusers==0.42.1 -d .whl
# then, through the device tool (500 s of timeouts plus the install):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
log=$out/gpu_check.log
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
# Few repeats: the medians of a 12B step vary by a few percent on a lent card; the parts must fit the call.
bench="python3 -m kontext bench -v --size full --device cuda --warmup 1 --repeat 3"
small="$bench --step-only"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda); import triton; print('triton', triton.__version__)"
  echo "== GPU tests"
  timeout -k 10 60 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
  echo "== precision step (fp32 reference, bf16, fp8, fp4), full size"
  # 48 GB of fp32 weights for the reference, freed before the other paths; fp8's first calls compile its kernels.
  timeout -k 10 100 python3 benchmarks/precision_step.py --size full --device cuda --warmup 2 --repeat 5
  echo "== bench, full size: bf16/fp8/fp4 x resident/stream/compiled, against diffusers"
  # Compiled last: its compile is the least predictable part, and the rows before it are in bench.json by then.
  timeout -k 10 220 $bench --paths bf16,fp8,fp4 --modes resident,stream,compiled --steps 8 --json "$out/bench.json"
  echo "== small card, 16 GB: fp8 resident"
  timeout -k 10 45 $small --paths fp8 --modes resident --memory-limit-gb 16 --json "$out/bench_16gb.json"
  echo "== small card, 8 GB: bf16 and fp4, resident and streamed"
  timeout -k 10 65 $small --paths bf16,fp4 --modes resident,stream --memory-limit-gb 8 --json "$out/bench_8gb.json"
} 2>&1 | tee "$log"
