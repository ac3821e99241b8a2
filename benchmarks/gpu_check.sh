#!/usr/bin/env bash
# One call on the GPU machine: build with CUDA, run the GoogleTest suite and the CUDA tests, a
# compute-sanitizer memcheck over a reduced sweep, then the op benchmark. Logs and JSON go under $OUT;
# a short table is printed last.   STAGES="build test sanitize bench app" (default: all) picks stages
# (app: the C++ examples built against the installed package, then the C++ decode app benchmark).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/tidal_gpu_out}
mkdir -p "$OUT"
STAGES=${STAGES:-"build test sanitize bench app"}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} PYTHONUNBUFFERED=1
# The GPU image's CXX (/opt/gcc/bin/g++) is a wrapper that links libstdc++ statically; a static copy
# inside an extension that torch's shared libstdc++ also serves crashes on the first formatted
# number (an error message). Build with the system compiler, which links it dynamically.
if [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc CUDAHOSTCXX=/usr/bin/g++; fi
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary=()
has() { [[ " $STAGES " == *" $1 "* ]]; }
stamp() { date +%s; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

if has build; then
  t0=$(stamp)
  # No network there: build in place with setup.py (pip would want to fetch build requirements).
  if TIDAL_BUILD_TESTS=1 "$PY" setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1; then
    summary+=("build: ok ($(( $(stamp) - t0 )) s)")
  else
    tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
  fi
  grep -iE "spill|warning" "$OUT/build.log" | grep -v "0 bytes spill" | head -5
fi

if has test; then
  t0=$(stamp)
  ctest --test-dir build -j 16 --output-on-failure >"$OUT/ctest.log" 2>&1; rc=$?
  summary+=("ctest: $(grep -E 'tests passed|tests failed' "$OUT/ctest.log" | tail -1) (rc $rc)")
  "$PY" -m pytest -q --maxfail=30 -p no:cacheprovider tests -k "cuda" >"$OUT/pytest_cuda.log" 2>&1; rc=$?
  tail -25 "$OUT/pytest_cuda.log"
  summary+=("pytest cuda: $(tail -1 "$OUT/pytest_cuda.log") (rc $rc, $(( $(stamp) - t0 )) s)")
fi

if has sanitize; then
  t0=$(stamp)
  compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -m pytest -q -p no:cacheprovider tests/test_ops.py \
    -k "cuda and B3 and (test_decode_attention or test_select_attention or test_sparse_attention_random or test_correct_kv_attention)" \
    >"$OUT/memcheck.log" 2>&1; rc=$?
  summary+=("memcheck: $(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log" | tail -1) / $(tail -1 "$OUT/memcheck.log") (rc $rc, $(( $(stamp) - t0 )) s)")
fi

if has bench; then
  "$PY" benchmarks/bench_ops.py --out "$OUT/ops.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -70
fi

if has app; then
  t0=$(stamp)
  EXAMPLES_DEVICE=cuda bash scripts/examples.sh >"$OUT/examples.log" 2>&1; rc=$?
  summary+=("examples (cuda): $(tail -1 "$OUT/examples.log") (rc $rc, $(( $(stamp) - t0 )) s)")
  "$PY" benchmarks/bench_cpp_app.py --out "$OUT/cpp_app.json" ${APP_ARGS:-} 2>&1 | grep -v '^\$' | tee "$OUT/cpp_app.log" | tail -12
fi

echo
echo "== gpu_check summary"
for line in "${summary[@]}"; do echo "  $line"; done
