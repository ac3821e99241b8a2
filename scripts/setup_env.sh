#!/usr/bin/env bash
# Installs what building, testing and the demo need, skipping whatever is already there (the GPU
# machine has torch 2.11 and no network, so nothing is fetched where it isn't missing).
#   bash scripts/setup_env.sh            # Python side: torch, transformers, pytest, numpy, cmake, ninja, pybind11
#   bash scripts/setup_env.sh --gtest    # also GoogleTest (Debian's libgtest-dev)
set -euo pipefail
PY=${PYTHON:-python3}

missing=()
"$PY" -c "import torch" 2>/dev/null || missing+=("torch==2.13.0")  # the CPU wheel
for mod in pytest numpy pybind11; do "$PY" -c "import $mod" 2>/dev/null || missing+=("$mod"); done
"$PY" -c "import transformers" 2>/dev/null || missing+=("transformers==5.17.0")  # the HuggingFace drop-in
command -v cmake >/dev/null || missing+=(cmake)
command -v ninja >/dev/null || missing+=(ninja)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup_env: installing ${missing[*]}"
  "$PY" -m pip install -q "${missing[@]}"
fi

if [ "${1:-}" = "--gtest" ] && ! find /usr /opt -name GTestConfig.cmake -print -quit 2>/dev/null | grep -q .; then
  echo "setup_env: installing libgtest-dev"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgtest-dev >/dev/null
fi
