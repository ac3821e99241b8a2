#!/usr/bin/env bash
# Builds the two C++ examples against the *installed* TidalDecode package and runs them small, on
# CPU (part of scripts/test.sh; needs the main build in build/, which test.sh makes first):
#   1. cmake --install build --prefix build/install        (find_package(TidalDecode) from there)
#   2. examples/cpp_decode: the LibTorch decode app; checks that top_k >= context reproduces full
#      attention and that a real TidalDecode schedule (head and group mode, KV-cache correction,
#      projections on and off, batch with unequal lengths) runs
#   3. examples/torchscript: export.py scripts and saves the decoder and Python's outputs; ts_run
#      (DecodeContext from the C++ API) and ts_run_dispatcher (no TidalDecode symbol referenced)
#      load it with torch::jit::load and must reproduce every output exactly
# EXAMPLES_DEVICE=cuda runs the decode app on the GPU instead (the TorchScript check stays on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${EXAMPLES_DEVICE:-cpu}
OUT=build/examples
mkdir -p "$OUT"
t_start=$(date +%s)

if [ ! -f build/libtidal.so ]; then
  echo "examples: build/libtidal.so is missing; build first (TIDAL_BUILD_TESTS=1 pip install --no-build-isolation --no-deps -e .)" >&2
  exit 1
fi
cmake --install build --prefix build/install >/dev/null
TORCH_PREFIX=$("$PY" -c "import torch; print(torch.utils.cmake_prefix_path)")
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
build_example() {  # name, source folder
  cmake -S "$2" -B "$OUT/$1" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$PWD/build/install;$TORCH_PREFIX" >"$OUT/$1.configure.log" 2>&1 \
    || { cat "$OUT/$1.configure.log"; exit 1; }
  cmake --build "$OUT/$1" -j "$(nproc)" >"$OUT/$1.build.log" 2>&1 || { cat "$OUT/$1.build.log"; exit 1; }
}
echo "-- build examples/cpp_decode and examples/torchscript against build/install"
build_example cpp_decode examples/cpp_decode
build_example torchscript_cpp examples/torchscript
echo "   built in $(( $(date +%s) - t_start )) s"

# ---- 1. the C++ decode app
APP="$OUT/cpp_decode/tidal_decode"
# One CPU thread: CI machines are small, and OpenMP threads competing for busy cores make a step
# take 100x longer (the times printed here are no benchmark anyway).
SMALL=(--device "$DEVICE" --layers 4 --heads 8 --kv-heads 2 --head-dim 64 --warmup 2 --steps 4 --threads 1)
json_check() {  # file, python expression over row `r`, message
  "$PY" - "$1" "$2" "$3" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
ok = eval(sys.argv[2], {}, {"r": r})
print(f"   {sys.argv[3]}: {'ok' if ok else 'FAILED'} ({sys.argv[2]}; full {r['ms_full']:.2f} ms, tidal {r['ms_tidal']:.2f} ms, cosine {r['first_step_cosine_update']:.6f}, max diff {r['first_step_max_diff']:.3g})")
sys.exit(0 if ok else 1)
EOF
}
echo "-- cpp_decode: top_k >= context must reproduce full attention (projections on, B=2 ragged)"
"$APP" "${SMALL[@]}" --context 2048 --prefill random --batch 2 --ragged --top-k 4096 --select-layers 1,3 \
  --json "$OUT/app_exact.json"
# CPU: the same kernels give the same bits; CUDA: the sparse kernel sums in another order (bf16 noise).
if [ "$DEVICE" = cpu ]; then exact="r['first_step_max_diff'] == 0"; else exact="r['first_step_cosine_update'] > 0.999"; fi
json_check "$OUT/app_exact.json" "$exact" "equals full attention"
echo "-- cpp_decode: chunked prefill, TidalDecode schedule, head mode, KV-cache correction every 3 steps"
"$APP" "${SMALL[@]}" --context 1536 --prefill run --prefill-chunk 512 --batch 2 --ragged --top-k 256 --sink 4 \
  --recent 16 --select-layers 1,3 --correction-stride 3 --json "$OUT/app_head.json"
json_check "$OUT/app_head.json" "r['corrections'] >= 1 and r['speedup'] > 0" "ran with corrections"
echo "-- cpp_decode: projections off (attention only), group mode, bfloat16"
"$APP" "${SMALL[@]}" --context 2048 --prefill random --batch 3 --top-k 256 --select-layers 2 --mode group \
  --projections off --dtype bfloat16 \
  --json "$OUT/app_group.json"
json_check "$OUT/app_group.json" "r['speedup'] > 0" "ran"

# ---- 2. TorchScript: Python scripts + runs, C++ loads + runs, outputs must be identical
echo "-- torchscript: export (Python) and run (C++)"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" examples/torchscript/export.py --out "$OUT/torchscript"
for exe in ts_run ts_run_dispatcher; do
  echo "   $exe:"
  log="$OUT/torchscript/$exe.log"
  "$OUT/torchscript_cpp/$exe" "$OUT/torchscript/model.pt" "$OUT/torchscript/data.pt" | tee "$log"
  grep -q "^torchscript: outputs equal python (max diff 0)$" "$log"
done
# The dispatcher-only program must really reference nothing of the library, yet have it linked.
DISPATCH="$OUT/torchscript_cpp/ts_run_dispatcher"
if nm -DC --undefined-only "$DISPATCH" | grep -q "tidal::"; then
  echo "examples: ts_run_dispatcher references a TidalDecode symbol; it proves nothing about --no-as-needed" >&2
  exit 1
fi
if command -v readelf >/dev/null; then
  readelf -d "$DISPATCH" | grep -q "NEEDED.*libtidal" || { echo "examples: libtidal.so not linked into ts_run_dispatcher" >&2; exit 1; }
  echo "   ts_run_dispatcher: no tidal:: symbol referenced, libtidal.so linked (--no-as-needed): ok"
fi
echo "-- examples: all passed ($(( $(date +%s) - t_start )) s)"
