#!/usr/bin/env bash
# Make .venv hold this checkout's two distributions, installed editable: `remoteloss` (client/,
# the SDK and its command line) and `remoteloss-server` (server/, the server and the load
# generator), the latter with the given extras, e.g. `scripts/install.sh server,test`;
# scripts/serve.sh and scripts/test.sh call it first. `server` names the server distribution
# itself (always installed); the others are its extras: `test` (pytest, mypy, the tools the tests
# run), `bench` (matplotlib, for `remoteloss bench --plot`).
#
# One kind of install for both (editable), so alternating them never flips .venv between an
# editable and a copied install. The install is skipped while it is current: .venv records
# what was installed (the torch pin, the hash of both pyproject.toml files, the server's setup.py and
# its native front's source, and the extras) and the
# installed metadata still says "editable, from this checkout's client/ and server/". A restart
# then costs no pip run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# torch first and pinned exactly, so pip takes the CPU build instead of the large CUDA one.
# The Dockerfile installs the same pin, so the image runs the torch the tests ran.
TORCH="torch==2.13.0"
wanted="${1:-server}"
stamp=.venv/.remoteloss-install

[ -x .venv/bin/python ] || python3 -m venv .venv
key="$TORCH $(.venv/bin/python -c '
import hashlib, sys
digest = hashlib.sha256()
for path in sys.argv[1:]:
    digest.update(open(path, "rb").read())
print(digest.hexdigest())' client/pyproject.toml server/pyproject.toml server/setup.py server/native/*)"

# The extras already installed for this key (none when the key changed), and the union with $wanted.
installed=""
if [ -f "$stamp" ] && [ "$(sed -n 1p "$stamp")" = "$key" ]; then
    installed="$(sed -n 2p "$stamp")"
fi
extras="$(printf '%s\n' "${installed//,/$'\n'}" "${wanted//,/$'\n'}" | sed '/^$/d' | sort -u | paste -sd, -)"

# Current: the same key, every wanted extra among the installed ones, and pip's metadata still
# says each distribution is installed editable from its folder here (not replaced by a
# `pip install ./client` since).
if [ "$extras" = "$installed" ] && .venv/bin/python -I - "$PWD" <<'PY'
import json, pathlib, sys
from importlib import metadata

root = pathlib.Path(sys.argv[1]).resolve()
for name, folder in (("remoteloss", "client"), ("remoteloss-server", "server")):
    try:
        origin = json.loads(metadata.distribution(name).read_text("direct_url.json") or "{}")
    except metadata.PackageNotFoundError:
        sys.exit(1)
    if not origin.get("dir_info", {}).get("editable") or origin.get("url") != (root / folder).as_uri():
        sys.exit(1)
PY
then
    exit 0
fi

# The server distribution's extras: every wanted word but `server`, which names the distribution.
server_extras="$(printf '%s\n' "${extras//,/$'\n'}" | sed '/^server$/d' | paste -sd, -)"
rm -f "$stamp"
.venv/bin/python -m pip install --quiet "$TORCH"
.venv/bin/python -m pip install --quiet -e ./client -e "./server${server_extras:+[$server_extras]}"
printf '%s\n%s\n' "$key" "$extras" >"$stamp"
