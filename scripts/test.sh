#!/usr/bin/env bash
# Builds everything (op library + GoogleTest suite) and runs every test: ctest, then pytest.
# On a machine with a GPU the same command also runs the CUDA variants of the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

bash scripts/setup_env.sh --gtest
echo "== build"
TIDAL_BUILD_TESTS=1 "$PY" -m pip install --no-build-isolation --no-deps -q -e .
echo "== GoogleTest (ctest)"
ctest --test-dir build --output-on-failure -j "$(nproc)"
echo "== pytest"
"$PY" -m pytest -q tests
echo "== examples"; bash scripts/examples.sh
