#!/usr/bin/env bash
# Install, then run the main job. Until the pipeline lands, the main job is the solver benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DEQLIB_VENV:-.venv}"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[dev]"
"$VENV/bin/python" -m deqlib.bench solvers
