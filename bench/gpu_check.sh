#!/usr/bin/env bash
# The prepared GPU check (issue 15): one command for a lent GPU machine, 540 s of step limits in all.
#
#   on the CPU machine, once:  bash ../shared/gpu/fetch-wheels.sh         (wheels -> .whl/)
#   on the GPU machine:        bash bench/gpu_check.sh                    (carry .whl along with the tree)
#   rehearsal on a CPU:        bash bench/gpu_check.sh --dry-run          (every step, small sizes, NumPy)
#
# Steps, each under its own timeout, in order of value: versions and the GPU; pytest -m gpu;
# GPU/CPU parity (2D, 3D); per-stage GPU timings, GB/s and memory at 256^3 and 512^3 (one
# process per size; 1024^3 on request); chunked runs on a 0.5 GiB Zarr with --device gpu (one
# GPU worker of 4 host threads, then of 1: --gpu-threads), then one with --cluster local-cuda.
# Everything is appended as it happens to ONE file, bench/results/gpu_check_<GPU>_<date>.md,
# so a killed step leaves what it measured.
# Sizes and limits can be lowered from the environment (GPU_CHECK_SIZES, GPU_CHECK_CHUNKED_SHAPE, ...).
set -u
cd "$(dirname "$0")/.." || exit 1
DRY=0 TSCALE=1
[ "${1:-}" = "--dry-run" ] && DRY=1 TSCALE=${GPU_CHECK_DRY_TIME_SCALE:-4}  # a CPU is slower: same steps, longer limits
export PYTHONUNBUFFERED=1
START=$(date +%s)
if [ "$DRY" = 1 ]; then
  export DECLUMP_GPU_CHECK_DRY_RUN=1 PYTHONPATH=$PWD
  PY=${PYTHON:-.venv/bin/python}
  SIZES=${GPU_CHECK_SIZES:-32,48,64}
  CHUNKED_SHAPE=${GPU_CHECK_CHUNKED_SHAPE:-64,128,128}; CHUNKS=${GPU_CHECK_CHUNKS:-32,64,64}
  CUDA_SHAPE=${GPU_CHECK_CUDA_SHAPE:-64,128,128}
else
  PY=${PYTHON:-python3}
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
      || echo "gpu_check: wheel install failed; going on with what is installed"
  else
    echo "gpu_check: no .whl/ here (run ../shared/gpu/fetch-wheels.sh and carry .whl); going on without"
  fi
  export PYTHONPATH=/tmp/site:$PWD
  SIZES=${GPU_CHECK_SIZES:-256,512}  # GPU_CHECK_SIZES=256,512,1024 adds 1024^3 (90 s more)
  CHUNKED_SHAPE=${GPU_CHECK_CHUNKED_SHAPE:-512,1024,1024}; CHUNKS=${GPU_CHECK_CHUNKS:-256,512,512}
  CUDA_SHAPE=${GPU_CHECK_CUDA_SHAPE:-512,1024,1024}
fi
RESULTS=$($PY -m bench.gpu_check results-path) || { echo "gpu_check: cannot start python ($PY)"; exit 1; }
echo "gpu_check: results -> $RESULTS"

# step NAME SECONDS COMMAND...: run under a timeout, stdout+stderr appended to the results file as they come.
step() {
  local name=$1 limit=$(( $2 * TSCALE ))
  shift 2
  echo "## $name (limit ${limit} s, at $(( $(date +%s) - START )) s)" | tee -a "$RESULTS"
  echo '```' >> "$RESULTS"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$RESULTS"
  local rc=${PIPESTATUS[0]}
  echo '```' >> "$RESULTS"
  echo "step $name: exit $rc$([ "$rc" = 124 ] && echo ' (timed out)') after $(( $(date +%s) - START )) s" | tee -a "$RESULTS"
  echo >> "$RESULTS"
}

step versions "${GPU_CHECK_T_VERSIONS:-30}" $PY -m bench.gpu_check versions
step "pytest -m gpu" "${GPU_CHECK_T_PYTEST:-180}" $PY -m pytest -m gpu -q -rs -p no:cacheprovider --continue-on-collection-errors tests
step parity "${GPU_CHECK_T_PARITY:-40}" $PY -m bench.gpu_check parity
IFS=, read -r -a SIZE_LIST <<< "$SIZES"
LIMITS=(${GPU_CHECK_T_STAGES:-40 45 90})
for i in "${!SIZE_LIST[@]}"; do
  step "stages ${SIZE_LIST[$i]}^3" "${LIMITS[$i]:-60}" $PY -m bench.gpu_check stages --size "${SIZE_LIST[$i]}"
done
step "chunked $CHUNKED_SHAPE --device gpu, --gpu-threads ${GPU_CHECK_GPU_THREADS:-4,1}" "${GPU_CHECK_T_CHUNKED:-150}" \
  $PY -m bench.gpu_check chunked --shape "$CHUNKED_SHAPE" --chunks "$CHUNKS" --gpu-threads "${GPU_CHECK_GPU_THREADS:-4,1}"
step "chunked $CUDA_SHAPE --cluster local-cuda" "${GPU_CHECK_T_CUDA:-55}" \
  $PY -m bench.gpu_check chunked --shape "$CUDA_SHAPE" --chunks "$CHUNKS" --cluster local-cuda
echo "gpu_check: done in $(( $(date +%s) - START )) s; results in $RESULTS" | tee -a "$RESULTS"
