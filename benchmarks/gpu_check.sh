#!/usr/bin/env bash
# One call on a lent GPU machine (see ../.library/device/README.md): GPU tests, then our DiT step time against
# diffusers' on the same weights, written to $OUT/gpu_check.log. That machine has torch 2.11, transformers 5.x,
# pytest, einops, safetensors and tokenizers, but no diffusers: carry its pure-Python wheel, or the peer timing is
# skipped. Here, once:  echo /.whl/ >> .git/info/exclude; pip download --no-deps diffusers==0.42.1 -d .whl
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
export PYTHONUNBUFFERED=1
log=${OUT:-/tmp}/gpu_check.log
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
  for res in 512 1024; do
    timeout 240 python3 benchmarks/dit_step.py --size full --device cuda --dtype bf16 --res $res --repeat 5
  done
} 2>&1 | tee "$log"
