#!/usr/bin/env bash
# Install the server into .venv (only when needed: see scripts/install.sh) and start it, on
# localhost:50051 by default. Arguments go to remoteloss-server unchanged; see
# `scripts/serve.sh --help` (`scripts/serve.sh --host '[::]'` listens on every interface).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install.sh server
exec .venv/bin/remoteloss-server "$@"
