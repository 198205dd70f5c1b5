#!/usr/bin/env bash
# Creates (idempotently) what the end-to-end tests need:
# - the Python virtual environment with the official SDKs and tools the tests drive the real
#   `openims` binary with ($OPENIMS_VENV, default ~/.cache/openims-venv, outside the clone, so
#   CI reuses it);
# - for the web console's browser tests (tests/e2e/test_console.py): Debian's `chromium`
#   (/usr/bin/chromium, installed with apt-get when missing) and console/node_modules
#   (`npm ci`: playwright-core drives that Chromium; it downloads no browser of its own).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

# -- web console: Node packages and a headless Chromium ------------------------------------
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "Node.js >= 18.18 and npm are needed (building the console and its browser tests)" >&2
  exit 1
fi
console="$here/console"
if [ ! -f "$console/node_modules/.package-lock.json" ] \
   || [ "$console/package-lock.json" -nt "$console/node_modules/.package-lock.json" ]; then
  (cd "$console" && npm ci --no-audit --no-fund --loglevel=error)
fi
if [ ! -x /usr/bin/chromium ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi

# -- Python venv -----------------------------------------------------------------------------
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
