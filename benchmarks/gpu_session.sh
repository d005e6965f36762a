#!/usr/bin/env bash
# One prepared session on a lent GPU machine (torch, timm, accelerate preinstalled; no network):
# install the wheels that ../shared/tools/device-wheels.sh put in .whl/, record the machine,
# then run the GPU benchmark, which includes bf16 train.py runs and a full fine-tune + report.
#   bash benchmarks/gpu_session.sh OUT_DIR [extra gpu_throughput.py arguments]
set -euo pipefail
out=${1:?output folder}; shift
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nproc
  python3 -c "import torch, timm, accelerate, datasets; print('torch', torch.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__)"
} 2>&1 | tee "$out/machine.txt"
python3 benchmarks/gpu_throughput.py --json "$out/gpu_throughput.json" --work-dir /tmp/gpu-bench "$@" \
  2>&1 | tee "$out/gpu_throughput.log"
cp /tmp/gpu-bench/finetune/metrics.jsonl "$out/finetune_metrics.jsonl" 2>/dev/null || true
cp -r /tmp/gpu-bench/finetune/eval "$out/finetune_eval" 2>/dev/null || true
cp /tmp/gpu-bench/finetune/training_curves.png /tmp/gpu-bench/finetune/stdout.txt "$out/" 2>/dev/null || true
