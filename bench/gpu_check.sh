#!/usr/bin/env bash
# GPU check, for a session that is lent a GPU machine: build the CUDA part, run the GPU
# correctness tests, the G1 <-> G2 bandwidth benchmark and the vLLM TTFT comparison.
#
#   bash bench/gpu_check.sh            # results in $OUT (or ./gpu-check-out)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check-out}"
mkdir -p "$out"
log() { echo "== $*" | tee -a "$out/gpu_check.log"; }

log "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$out/gpu_check.log"
python3 --version | tee -a "$out/gpu_check.log"

log "install (CUDA kernels required: KVBM_CUDA=ON)"
python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null \
  || python3 -m pip install -q torch 2>&1 | tail -2
KVBM_CUDA=ON python3 -m pip install -q -e ".[dev]" 2>&1 | tail -3
python3 -c "from kvbm import ops; print('CUDA built', ops.CUDA_BUILT, 'available', ops.cuda_available())" \
  | tee -a "$out/gpu_check.log"

log "GPU correctness tests"
KVBM_EXPECT_CUDA=1 timeout 300 python3 -m pytest -q -m gpu tests/ 2>&1 | tail -15 | tee -a "$out/gpu_check.log"
KVBM_EXPECT_CUDA=1 timeout 300 python3 -m pytest -q tests/test_ops.py tests/test_dataplane.py 2>&1 | tail -3 \
  | tee -a "$out/gpu_check.log"

log "G1 <-> G2 bandwidth"
timeout 180 python3 bench/bench_device.py --json > "$out/bench_device.json" 2>&1
timeout 180 python3 bench/bench_device.py 2>&1 | tee -a "$out/gpu_check.log"

log "vLLM TTFT: recompute vs kvbm (G2) vs vLLM OffloadingConnector"
python3 -c "import vllm" 2>/dev/null || timeout 240 python3 -m pip install -q "vllm==0.32.0" 2>&1 | tail -2
if python3 -c "import vllm, torch; assert torch.cuda.is_available()" 2>/dev/null; then
  VLLM_ENABLE_V1_MULTIPROCESSING=0 timeout 420 python3 bench/vllm_ttft.py --reps 5 --timeout 130 \
    --json "$out/vllm_ttft.json" 2>&1 | tail -8 | tee -a "$out/gpu_check.log"
else
  echo "vllm (CUDA) not importable: TTFT comparison skipped" | tee -a "$out/gpu_check.log"
fi
