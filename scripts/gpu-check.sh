#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run: the Triton kernels' test cases on the GPU (the same
# cases the CPU suite runs through Triton's interpreter, plus torch.compile on the GPU), then
# `lordba bench --suite gpu`. Everything lands in OUT_DIR (logs, gpu.json, gpu.md, gpu_overhead.png).
#
#   bash scripts/gpu-check.sh [OUT_DIR]      # python: $PYTHON, else python3; lordba, the lab and
#                                            # tests/ importable (installed, or PYTHONPATH=src:lab:tests)
set -uo pipefail
out=${1:-results/gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $py -c "import torch, triton, transformers, peft; print('torch', torch.__version__, '| cuda', torch.version.cuda, \
'| triton', triton.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
} 2>&1 | tee "$out/gpu-info.txt"
status=0
LORDBA_TRITON_DEVICE=cuda timeout 300 $py -m pytest -q -p no:cacheprovider --rootdir tests \
  tests/kernels/triton/triton_cases.py 2>&1 | tee "$out/triton-cases.log" || status=1
timeout "${GPU_BENCH_TIMEOUT:-420}" $py -m lordba_lab.bench.gpu ${GPU_BENCH_ARGS:-} --out "$out" 2>&1 \
  | tee "$out/bench.log" || status=1
exit $status
