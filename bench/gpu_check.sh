#!/usr/bin/env bash
# GPU check, for a session that is lent a GPU machine (offline: nothing can be fetched there,
# so the build uses the machine's own torch, nanobind and scikit-build-core):
#   build the CUDA kernels (KVBM_CUDA=ON), run the GPU tests and the data-plane suites with a
#   GPU present (host pools pinned), then the G1 <-> G2 bandwidth and interference benchmark.
#
#   bash bench/gpu_check.sh            # log and JSON in $OUT (or ./gpu-check-out)
#
# vLLM's CUDA build cannot be installed on an offline machine, so the TTFT comparison against
# vLLM's OffloadingConnector (bench/vllm_ttft.py) runs only where `import vllm` works.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check-out}"
mkdir -p "$out"
exec > >(tee -a "$out/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
step() { echo; echo "== $* ($(date +%T), ${SECONDS}s)"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 --version
nvcc --version | tail -2

step "build (KVBM_CUDA=ON; no build isolation, no dependency downloads)"
if ! KVBM_CUDA=ON timeout 300 python3 -m pip install -q --no-build-isolation --no-deps -e .; then
  echo "pip could not build it here; a plain CMake build instead"
  cmake -S . -B build/gpu -DKVBM_CUDA=ON -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v python3)" \
    && cmake --build build/gpu -j "$(nproc)" && cp build/gpu/_native*.so kvbm/ \
    && ln -sfn ../policies kvbm/policies || { echo "BUILD FAILED"; exit 1; }
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "from kvbm import ops; print('native', ops.HAVE_NATIVE, 'CUDA built', ops.CUDA_BUILT, \
'available', ops.cuda_available()); assert ops.cuda_available()" || { echo "CUDA NOT AVAILABLE"; exit 1; }

step "GPU tests (-m gpu must not skip)"
KVBM_EXPECT_CUDA=1 KVBM_REQUIRE_NATIVE=1 timeout 240 python3 -m pytest -q -p no:cacheprovider -rs \
  tests/test_gpu.py tests/test_ops.py tests/test_connector_paged.py tests/test_connector_trtllm.py

step "issue 17's native ops built by this machine's compiler, on its CPU: native == fallback"
timeout 120 python3 -m pytest -q -p no:cacheprovider -rs tests/test_ops_copy.py tests/test_ops_file_io.py

step "data-plane and connector suites with a GPU present (pinned host pools)"
timeout 240 python3 -m pytest -q -p no:cacheprovider -rs tests/test_dataplane.py tests/test_tiers_e2e.py \
  tests/test_disk.py tests/test_offload.py

step "G1 <-> G2 bandwidth per path and block size; interference with a matmul loop"
timeout 240 python3 bench/bench_device.py --repeat 3

step "issue 17 on real hardware: G2 gather vs one thread's sequential copy; G2 <-> G3 vs dd, fio, NIXL POSIX"
timeout 90 python3 bench/bench_ops.py --blocks 2048 --repeat 5
timeout 150 python3 bench/bench_disk.py --gib 1 --sizes 2M,256K --repeat 2 --json > "$out/bench_disk.json" \
  && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('limits', d['limits']); \
[print(r['block'], {k: round(v, 2) for k, v in r.items() if k.startswith('ratio')}) for r in d['rows']]" "$out/bench_disk.json"

step "vLLM TTFT vs OffloadingConnector"
if python3 -c "import vllm, torch; assert torch.cuda.is_available()" 2>/dev/null; then
  VLLM_ENABLE_V1_MULTIPROCESSING=0 timeout 420 python3 bench/vllm_ttft.py --reps 5 --timeout 130 \
    --json "$out/vllm_ttft.json" 2>&1 | tail -8
else
  echo "vllm (CUDA) is not importable here: TTFT comparison skipped"
fi
step "kvbm replay against vllm serve: vLLM alone vs + kvbm G2 vs + G2 + G3 (bench/vllm_serve_compare.py)"
if python3 -c "import vllm, httpx" 2>/dev/null; then
  timeout 1200 python3 bench/vllm_serve_compare.py --configs a,b,c --json "$out/vllm_serve_compare.json" 2>&1 | tail -12
else
  echo "vllm (or httpx) is not importable here: the replay against vllm serve is skipped"
fi
step "done"
