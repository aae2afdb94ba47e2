#!/usr/bin/env bash
# Install the server into .venv and start it (default: localhost:50051).
# Arguments go to remoteloss-server unchanged; see `scripts/serve.sh --help`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

[ -x .venv/bin/python ] || python3 -m venv .venv
# torch first and pinned exactly, so pip takes the CPU build instead of the large CUDA one.
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet '.[server]'
exec .venv/bin/remoteloss-server "$@"
