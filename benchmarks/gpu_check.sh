#!/usr/bin/env bash
# Meant for a lent GPU machine (H100/H200, 80 GB or more): one call runs the GPU tests, then one denoising step at
# bf16/fp8/fp4 against fp32 (benchmarks/precision_step.py, full size, random weights made on the GPU), then our DiT
# step against diffusers' at 1024px (benchmarks/dit_step.py). Each part has its own timeout (8 minutes in all at
# most); everything is tee'd to $OUT/gpu_check.log and the precision numbers also go to
# $OUT/precision_step.json. That machine has torch, triton, pytest, einops, safetensors and transformers but no
# diffusers: carry its pure-Python wheel, or the peer timing is skipped. Here, once:
#   echo /.whl/ >> .git/info/exclude; pip download --no-deps diffusers==0.42.1 -d .whl
# then, through the device tool:
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
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda); import triton; print('triton', triton.__version__)"
  echo "== GPU tests"
  timeout -k 10 90 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
  echo "== precision step (fp32 reference, bf16, fp8, fp4), full size"
  # 48 GB of fp32 weights for the reference, freed before the other paths; fp8's first calls compile its kernels.
  timeout -k 10 270 python3 benchmarks/precision_step.py --size full --device cuda
  echo "== DiT step, ours against diffusers, 1024px"
  timeout -k 10 120 python3 benchmarks/dit_step.py --size full --device cuda --dtype bf16 --res 1024 --repeat 5
} 2>&1 | tee "$log"
