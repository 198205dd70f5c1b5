#!/usr/bin/env bash
# Full test run: Rust unit/integration tests (nextest) + the end-to-end suite against the real
# `openims` binary driven by the official clients (tests/e2e). Exits non-zero on any failure.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

"$here/scripts/setup-test-env.sh"
venv=${OPENIMS_VENV:-$HOME/.cache/openims-venv}

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/openims-target}
cargo build --bin openims

if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
cargo nextest run --workspace

export OPENIMS_BIN=${OPENIMS_BIN:-$CARGO_TARGET_DIR/debug/openims}
# Each xdist worker starts its own session server (own data dir and port), so -n is safe.
"$venv/bin/python" -m pytest tests/e2e -q -x --timeout 300 -p no:cacheprovider -n 2 --dist loadfile "$@"
