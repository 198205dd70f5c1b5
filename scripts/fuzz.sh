#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for SECONDS each (default 60), after generating the seed
# corpus (fuzz/make-seeds.sh, needs qemu-img). Needs a nightly toolchain and cargo-fuzz
# (`cargo install cargo-fuzz`). Exits non-zero on the first crash (artifacts in fuzz/artifacts/).
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
secs=${1:-60}
shift || true
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here/fuzz"
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz missing: cargo install cargo-fuzz" >&2; exit 1; }
rustup run nightly rustc --version >/dev/null 2>&1 || { echo "nightly toolchain missing: rustup toolchain install nightly" >&2; exit 1; }
[ -d corpus/inspect_any ] || ./make-seeds.sh >/dev/null
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
for t in "${targets[@]}"; do
  echo "== $t (${secs}s)"
  # Inputs up to 4 MiB so real vhdx/vdi seeds fit; 2 GiB RSS cap catches unbounded allocation.
  mkdir -p artifacts
  if ! cargo +nightly fuzz run -O "$t" "corpus/$t" -- \
    -max_total_time="$secs" -max_len=4194304 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
    -timeout=10 -print_final_stats=1 >"artifacts/$t.log" 2>&1; then
    tail -40 "artifacts/$t.log" >&2
    echo "$t: FAILED (full log fuzz/artifacts/$t.log, inputs in fuzz/artifacts/$t/)" >&2
    exit 1
  fi
  grep -E "^stat::(number_of_executed_units|peak_rss_mb)" "artifacts/$t.log" | tr '\n' ' '
  echo
done
