#!/usr/bin/env bash
# benches/scale: API requests/second and jobs/minute with 1 and 3 `openims serve` nodes sharing
# one PostgreSQL database and one S3 store (moto on loopback), against the single-node default
# (SQLite + local directory) measured in the same invocation. See README.md.
#   JOBS=30 SIZE_MIB=8 SECS=10 PROCS=4 benches/scale/run.sh
# Needs PostgreSQL at $OPENIMS_TEST_PG_URL (default postgres://postgres@127.0.0.1:5432) and the
# test venv (scripts/setup-test-env.sh). Uses the release binary if built, else debug
# (override with OPENIMS_BIN).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
"$root/scripts/setup-test-env.sh"
venv=${OPENIMS_VENV:-$HOME/.cache/openims-venv}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/openims-target}
if [ -z "${OPENIMS_BIN:-}" ]; then
  if [ "${PROFILE:-release}" = release ]; then
    (cd "$root" && cargo build --release --bin openims -q)
    export OPENIMS_BIN=$CARGO_TARGET_DIR/release/openims
  else
    (cd "$root" && cargo build --bin openims -q)
    export OPENIMS_BIN=$CARGO_TARGET_DIR/debug/openims
  fi
fi
echo "binary: $OPENIMS_BIN  nproc=$(nproc)  load: $(cut -d' ' -f1-3 /proc/loadavg)"
RUST_LOG=warn exec "$venv/bin/python" "$here/scale.py" --jobs "${JOBS:-30}" --size-mib "${SIZE_MIB:-8}" \
  --secs "${SECS:-10}" --procs "${PROCS:-4}"
