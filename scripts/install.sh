#!/usr/bin/env bash
# Make .venv hold this checkout, installed editable with the given extras, e.g.
# `scripts/install.sh server,test`; scripts/serve.sh and scripts/test.sh call it first.
#
# One kind of install for both (editable), so alternating them never flips .venv between an
# editable and a copied install. The install is skipped while it is current: .venv records
# what was installed (the torch pin, the hash of pyproject.toml and the extras) and the installed
# metadata still says "editable, from this directory". A restart then costs no pip run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# torch first and pinned exactly, so pip takes the CPU build instead of the large CUDA one.
# The Dockerfile installs the same pin, so the image runs the torch the tests ran.
TORCH="torch==2.13.0"
wanted="${1:-server}"
stamp=.venv/.remoteloss-install

[ -x .venv/bin/python ] || python3 -m venv .venv
key="$TORCH $(.venv/bin/python -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' pyproject.toml)"

# The extras already installed for this key (none when the key changed), and the union with $wanted.
installed=""
if [ -f "$stamp" ] && [ "$(sed -n 1p "$stamp")" = "$key" ]; then
    installed="$(sed -n 2p "$stamp")"
fi
extras="$(printf '%s\n' "${installed//,/$'\n'}" "${wanted//,/$'\n'}" | sed '/^$/d' | sort -u | paste -sd, -)"

# Current: the same key, every wanted extra among the installed ones, and pip's metadata still
# says this directory is installed editable (not replaced by a `pip install .` since).
if [ "$extras" = "$installed" ] && .venv/bin/python -I - "$PWD" <<'PY'
import json, pathlib, sys
from importlib import metadata

try:
    origin = json.loads(metadata.distribution("remoteloss").read_text("direct_url.json") or "{}")
except metadata.PackageNotFoundError:
    sys.exit(1)
here = pathlib.Path(sys.argv[1]).resolve().as_uri()
sys.exit(0 if origin.get("dir_info", {}).get("editable") and origin.get("url") == here else 1)
PY
then
    exit 0
fi

rm -f "$stamp"
.venv/bin/python -m pip install --quiet "$TORCH"
.venv/bin/python -m pip install --quiet -e ".[$extras]"
printf '%s\n%s\n' "$key" "$extras" >"$stamp"
