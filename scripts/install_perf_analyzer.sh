#!/usr/bin/env bash
# Install Triton's load generator, `perf_analyzer`, into a folder of its own, bench/.perf_analyzer/
# (ignored by git), apart from .venv, and print the path of the command to run:
#
#   $(scripts/install_perf_analyzer.sh) -m mse_loss -u localhost:50051 -i grpc --shape input:1000 --shape target:1000
#
# The binary comes from the `tritonclient==2.50.0` wheel (PyPI's `perf-analyzer` wheels from 2.58
# on need glibc 2.38, and where pip falls back to the placeholder without the binary its wrapper
# also drops the exit code). It needs two shared libraries: libb64 (Debian's `libb64-0d`,
# installed with apt-get when missing and we are root) and the CUDA runtime, libcudart.so.12,
# from the `nvidia-cuda-runtime-cu12` wheel; no GPU is needed to run it. Both wheels are installed
# without their dependencies (the binary uses none of the Python client's), so nothing here touches
# .venv. bench/.perf_analyzer/perf_analyzer is a wrapper that sets LD_LIBRARY_PATH and runs the binary.
# A second run does nothing but print the path, unless the pins below change.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TRITONCLIENT="tritonclient==2.50.0"
CUDART="nvidia-cuda-runtime-cu12==12.9.79"
HOME_DIR="bench/.perf_analyzer"
wrapper="$HOME_DIR/perf_analyzer"
stamp="$HOME_DIR/.installed"

if [ "$(uname -sm)" != "Linux x86_64" ]; then
    echo "perf_analyzer from $TRITONCLIENT runs on x86-64 Linux only (this is $(uname -sm))" >&2
    exit 1
fi
if [ -x "$wrapper" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$TRITONCLIENT $CUDART" ]; then
    echo "$PWD/$wrapper"
    exit 0
fi

if ! /sbin/ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; then
    if [ "$(id -u)" != 0 ]; then
        echo "perf_analyzer needs libb64.so.0d: run \`apt-get install libb64-0d\` as root, then this again" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends libb64-0d >&2
fi

rm -rf "$HOME_DIR"
# Any pip installs into a folder given by --target; the project's .venv has one where python3 has none.
pip=(python3 -m pip)
if ! python3 -m pip --version >/dev/null 2>&1; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    pip=(.venv/bin/python -m pip)
fi
PIP_ROOT_USER_ACTION=ignore "${pip[@]}" install --quiet --disable-pip-version-check --no-deps \
    --target "$HOME_DIR/site" "$TRITONCLIENT" "$CUDART" >&2
binary="$(find "$HOME_DIR/site" -path '*/bin/perf_analyzer' -type f | head -n 1)"
libdir="$(dirname "$(find "$HOME_DIR/site" -name 'libcudart.so.12' | head -n 1)")"
if [ -z "$binary" ] || [ "$libdir" = . ]; then
    echo "the wheels held no perf_analyzer or libcudart.so.12" >&2
    exit 1
fi
chmod +x "$binary"
cat >"$wrapper" <<EOF
#!/bin/sh
# Written by scripts/install_perf_analyzer.sh: perf_analyzer with the CUDA runtime it links.
here="\$(cd "\$(dirname "\$0")" && pwd)"
LD_LIBRARY_PATH="\$here/${libdir#"$HOME_DIR/"}\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "\$here/${binary#"$HOME_DIR/"}" "\$@"
EOF
chmod +x "$wrapper"
"$wrapper" --version >/dev/null 2>&1
echo "$TRITONCLIENT $CUDART" >"$stamp"
echo "$PWD/$wrapper"
