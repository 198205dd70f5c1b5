#!/usr/bin/env bash
# Full test run: Rust unit/integration tests (nextest), a short fuzzing pass over every
# disk-format inspector and reader (scripts/fuzz.sh), then the end-to-end suite against the real
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

# Fuzzing: every target of fuzz/ for OPENIMS_FUZZ_SECS seconds (0 skips), two at a time, on the
# stable toolchain, built in its own target dir. 45 s x 13 targets / 2 cores is ~5 min of
# fuzzing plus the build; a crash fails the run (reproducer under fuzz/artifacts/).
"$here/scripts/fuzz.sh" "${OPENIMS_FUZZ_SECS:-45}"

export OPENIMS_BIN=${OPENIMS_BIN:-$CARGO_TARGET_DIR/debug/openims}
# Each xdist worker starts its own session server (own data dir and port), so -n is safe.
# The same suite runs twice: on SQLite (the embedded default), then on PostgreSQL, where every
# server gets a fresh database of its own (tests/e2e/helpers.py: OPENIMS_TEST_DB=postgres) and
# test_scale.py runs three nodes on one database and one S3 store. PostgreSQL:
# $OPENIMS_TEST_PG_URL (default postgres://postgres@127.0.0.1:5432; OPENIMS_SKIP_PG=1 skips).
pytest_e2e() {
  "$venv/bin/python" -m pytest tests/e2e -q -x --timeout 300 -p no:cacheprovider -n 2 --dist loadfile "$@"
}
OPENIMS_TEST_DB=sqlite pytest_e2e "$@"
if [ "${OPENIMS_SKIP_PG:-0}" != 1 ]; then
  OPENIMS_TEST_DB=postgres pytest_e2e "$@"
fi
