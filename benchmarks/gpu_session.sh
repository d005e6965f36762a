#!/usr/bin/env bash
# One prepared session on a lent GPU machine (torch, timm, accelerate preinstalled; no network).
# Installs the wheels that ../shared/tools/device-wheels.sh put in .whl/, records the machine,
# then runs, each part under its own time limit so that a slow part can't take the others:
#   1. gpu_throughput.py, the 10-epoch cats fine-tune (wall time, and train.py's own account
#      of where it went): first, because no earlier session got to measure it
#   2. gpu_throughput.py: the model-only bound over batch 128/256/384 (fused AdamW, MFU),
#      bf16 train.py with augment standard on the CPU path and on the device path
#      (augment_on: device, the pixel cache and roi_align on the GPU), strong, old settings
#   3. input_pipeline.py with up to 15 workers
#   4. loop_overhead.py on the GPU
#   5. gpu_throughput.py, the torch.compile part
# Usage: bash benchmarks/gpu_session.sh OUT_DIR [--tiny]   (--tiny: a CPU rehearsal)
# The parts' limits add up to 540 s, leaving the wheel install room under the run tool's
# 600 s a command. On 2026-11-28 an H200 session with 8 minutes in all
# lost the fine-tune wall time, the GPU loop overhead and compile to their limits.
set -uo pipefail
out=${1:?output folder}; shift
tiny=${1:-}
mkdir -p "$out"
if [ -z "${SKIP_WHEELS:-}" ] && compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled PET_PIPELINE_CACHE=/tmp/gpu-bench/cache
py=$(command -v python3)
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no GPU"
  echo "cores: $(nproc)"
  $py -c "import torch, timm, accelerate, datasets; print('torch', torch.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__)"
} 2>&1 | tee "$out/machine.txt"

part() {  # part NAME SECONDS COMMAND...: run with a limit, keep its log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)" | tee -a "$out/session.log"
  SECONDS=0
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "== $name: exit $? after ${SECONDS}s" | tee -a "$out/session.log"
  grep -v "^W[0-9]" "$out/$name.log" | tail -n 25
}

if [ "$tiny" = "--tiny" ]; then
  part finetune 300 $py benchmarks/gpu_throughput.py --tiny --skip eager old compile --work-dir /tmp/gpu-bench --json "$out/gpu_finetune.json"
  part throughput 300 $py benchmarks/gpu_throughput.py --tiny --skip finetune compile --work-dir /tmp/gpu-bench --json "$out/gpu_throughput.json"
  part input_pipeline 200 $py benchmarks/input_pipeline.py --sample-dir .bench-sample --images 200 --measure-images 128 --workers 0 1 --work-dir /tmp/gpu-bench/input --json "$out/input_pipeline.json"
  part loop_overhead 200 $py benchmarks/loop_overhead.py --repeats 1 --steps 20 --log-every 5 --json "$out/loop_overhead.json"
  exit 0
fi
part finetune 150 $py benchmarks/gpu_throughput.py --skip eager old compile --work-dir /tmp/gpu-bench --json "$out/gpu_finetune.json"
cp -r /tmp/gpu-bench/finetune/eval "$out/finetune_eval" 2>/dev/null
cp /tmp/gpu-bench/finetune/metrics.jsonl /tmp/gpu-bench/finetune/stdout.txt /tmp/gpu-bench/finetune/training_curves.png "$out/" 2>/dev/null
# 160 s: one more train.py run (the device path) than before; 20 s of it from the fine-tune,
# which took 27 s in the tiny rehearsal and is bounded by its 10 epochs on a GPU
part throughput 160 $py benchmarks/gpu_throughput.py --skip finetune compile --work-dir /tmp/gpu-bench --json "$out/gpu_throughput.json"
sample=.bench-sample  # the real Oxford sample, carried to the machine (not in git); else generated
[ -d "$sample" ] && pick=(--sample-dir "$sample") || pick=(--generated)
part input_pipeline 55 $py benchmarks/input_pipeline.py "${pick[@]}" --images 2000 --measure-images 1024 --workers 0 4 8 15 --work-dir /tmp/gpu-bench/input --json "$out/input_pipeline.json"
part loop_overhead 80 $py benchmarks/loop_overhead.py --model coatnet_0_rw_224 --image-size 224 --batch-size 128 --mixed-precision bf16 --steps 25 --log-every 5 --num-workers 12 --images-per-class 200 --repeats 1 --json "$out/loop_overhead.json"
part compile 95 $py benchmarks/gpu_throughput.py --skip bound eager strong old finetune --work-dir /tmp/gpu-bench --json "$out/gpu_throughput_compile.json"
true
