#!/usr/bin/env bash
# Install the project with its server and test extras into .venv, then run pytest.
# Arguments go to pytest unchanged, e.g. `scripts/test.sh tests/unit -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

[ -x .venv/bin/python ] || python3 -m venv .venv
# torch first and pinned exactly, so pip takes the CPU build instead of the large CUDA one.
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e '.[server,test]'
exec .venv/bin/python -m pytest "$@"
