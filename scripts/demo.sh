#!/usr/bin/env bash
# The main job: builds the package and runs the generate() demo on the built-in default model
# (SmolLM2-135M-Instruct, real weights; full attention vs TidalDecode on a pass-key question).
# Extra arguments go to the demo (python examples/generate_demo.py --help).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

bash scripts/setup_env.sh
"$PY" -m pip install --no-build-isolation --no-deps -q -e .
"$PY" examples/generate_demo.py "$@"
