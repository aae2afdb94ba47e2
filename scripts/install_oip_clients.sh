#!/usr/bin/env bash
# Make .venv-oip hold the Open Inference Protocol's Python clients that the tests drive against a
# real server (tests/integration/test_oip_clients.py): tritonclient's gRPC and HTTP clients and
# KServe's Python SDK (its gRPC and REST clients), which install beside each other.
# A venv of their own: both pin protobuf below the major version our generated stubs
# need, so it cannot share .venv. The tests skip (fail under CI) when .venv-oip is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x .venv-oip/bin/python ] || python3 -m venv .venv-oip
.venv-oip/bin/pip install -q "tritonclient[grpc,http]==2.73.0" "kserve==0.21.0" numpy
