#!/usr/bin/env bash
# Install the project with its server and test extras into .venv (only when needed: see
# scripts/install.sh), then run pytest. Arguments go to pytest unchanged, e.g.
# `scripts/test.sh tests/unit -x`; with none, the whole suite with its coverage floor.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install.sh server,test
# A full run (no arguments, as CI's) measures line coverage and fails under the floor; a run of
# chosen tests does not, since it covers only what it chose.
COVERAGE_FLOOR=92
if [ "$#" -eq 0 ]; then
    set -- --cov --cov-report=term --cov-fail-under="$COVERAGE_FLOOR"
fi
exec .venv/bin/python -m pytest "$@"
