#!/usr/bin/env bash
# Install, then run the main job: the whole DVC pipeline with the small profile
# (`dvc exp run -S profile=small`), then show its metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DEQLIB_VENV:-.venv}"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch is pinned and installed first so no other requirement can pull a CUDA build.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[dev]"
export PATH="$PWD/$VENV/bin:$PATH"
# DVC experiments commit to hidden refs; give git an identity if the machine has none.
git config user.email >/dev/null || export GIT_AUTHOR_NAME=deqlib GIT_AUTHOR_EMAIL=deqlib@localhost \
  GIT_COMMITTER_NAME=deqlib GIT_COMMITTER_EMAIL=deqlib@localhost
dvc exp run -S profile=small
dvc metrics show
