#!/usr/bin/env bash
# The main job: builds the package and runs the decode demo on its built-in default model.
# Extra arguments go to the demo (python examples/decode_demo.py --help).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

bash scripts/setup_env.sh
"$PY" -m pip install --no-build-isolation --no-deps -q -e .
"$PY" examples/decode_demo.py "$@"
