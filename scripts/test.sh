#!/usr/bin/env bash
# Install the project with its server and test extras into .venv (only when needed: see
# scripts/install.sh), then run pytest. Arguments go to pytest unchanged, e.g.
# `scripts/test.sh tests/unit -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install.sh server,test
exec .venv/bin/python -m pytest "$@"
