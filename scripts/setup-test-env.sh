#!/usr/bin/env bash
# Creates (idempotently) the Python virtual environment the end-to-end tests use:
# the official SDKs and tools the tests drive the real `openims` binary with.
# Location: $OPENIMS_VENV, default ~/.cache/openims-venv (outside the clone, so CI reuses it).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${OPENIMS_VENV:-$HOME/.cache/openims-venv}
req="$here/tests/e2e/requirements.txt"
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -r "$req"
echo "$want" > "$stamp"
echo "test environment ready in $venv"
