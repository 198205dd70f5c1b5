#!/usr/bin/env bash
# Runs the libFuzzer targets of fuzz/ for SECONDS each (default 60), two at a time, on the
# STABLE toolchain (no cargo-fuzz, no nightly): the fuzz crate is built with `cargo build
# --release` and the sanitizer-coverage flags cargo-fuzz would pass, and each target binary is
# run directly with libFuzzer flags on its corpus dir fuzz/corpus/<target> (seeded by
# fuzz/make-seeds.sh, which needs qemu-img; without it the targets start from an empty corpus).
#
# Exits non-zero if any target crashed, hung (-timeout), ran out of memory or was not
# instrumented; prints the reproducer path and the tail of its log (fuzz/artifacts/<target>.log).
# Reproduce a crash with: $OPENIMS_FUZZ_TARGET/<host>/release/<target> <reproducer>
#
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]     (SECONDS=0 skips)
# Env: OPENIMS_FUZZ_TARGET  build dir (default ~/.cache/openims-fuzz-target)
#      OPENIMS_FUZZ_JOBS    targets run at once (default 2)
set -euo pipefail
secs=${1:-60}
shift || true
if [ "$secs" = 0 ]; then
  echo "fuzz: skipped (0 seconds)"
  exit 0
fi
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here/fuzz"
jobs=${OPENIMS_FUZZ_JOBS:-2}

export CARGO_TARGET_DIR=${OPENIMS_FUZZ_TARGET:-$HOME/.cache/openims-fuzz-target}
host=$(rustc -vV | sed -n 's/^host: //p')
# What `cargo fuzz build -O` passes (libFuzzer's inline 8-bit counters, PC table and compare
# tracing), plus debug assertions and overflow checks. `--target` keeps these flags off build
# scripts and proc macros, which are not linked with libFuzzer.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
unset CARGO_BUILD_RUSTFLAGS CARGO_ENCODED_RUSTFLAGS
echo "fuzz: building targets (stable, $CARGO_TARGET_DIR)"
cargo build --release --locked --target "$host" --bins
bin=$CARGO_TARGET_DIR/$host/release

all=$(sed -n '/^\[\[bin\]\]/{n;s/^name = "\(.*\)"/\1/p}' Cargo.toml)
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets <<<"$all"
fi
for t in "${targets[@]}"; do
  grep -qx "$t" <<<"$all" || { echo "fuzz: no target $t (have: $(echo $all))" >&2; exit 2; }
done

missing=0
for t in "${targets[@]}"; do [ -d "corpus/$t" ] || missing=1; done
if [ $missing = 1 ]; then
  if command -v qemu-img >/dev/null; then
    ./make-seeds.sh >/dev/null
  else
    echo "fuzz: qemu-img missing, targets without seeds start from an empty corpus" >&2
  fi
fi

# One target: libFuzzer on its corpus; 4 MiB inputs so real vhdx/vdi seeds fit, 2 GiB RSS and
# 1 GiB single-allocation caps catch unbounded allocation, 10 s per input catches hangs.
run() {
  local t=$1
  mkdir -p "corpus/$t" "artifacts/$t"
  local rc=0
  timeout $((secs + 300)) "$bin/$t" "corpus/$t" -artifact_prefix="artifacts/$t/" \
    -max_total_time="$secs" -max_len=4194304 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
    -timeout=10 -print_final_stats=1 >"artifacts/$t.log" 2>&1 || rc=$?
  if [ $rc = 0 ] && ! grep -q "^INFO: Loaded [0-9]* modules *([0-9]* inline 8-bit counters)" "artifacts/$t.log"; then
    echo "fuzz: $t is not instrumented for coverage (see artifacts/$t.log)" >>"artifacts/$t.log"
    rc=3
  fi
  if [ $rc != 0 ]; then
    {
      echo "== $t: FAILED (exit $rc)"
      tail -40 "artifacts/$t.log"
      local repro
      repro=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "artifacts/$t.log" | tail -1)
      echo "$t: full log fuzz/artifacts/$t.log; reproducer: ${repro:+fuzz/$repro}"
      [ -n "$repro" ] && echo "$t: reproduce with: $bin/$t fuzz/$repro"
    } >&2
    return 1
  fi
  local cov execs rss
  cov=$(grep -o "cov: [0-9]*" "artifacts/$t.log" | tail -1)
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "artifacts/$t.log")
  rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "artifacts/$t.log")
  echo "== $t (${secs}s): ok, $execs execs, $cov, peak rss ${rss} MiB"
}

echo "fuzz: ${#targets[@]} targets, ${secs}s each, $jobs at a time"
mkdir -p artifacts
for t in "${targets[@]}"; do
  rm -f "artifacts/$t.failed"
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do
    wait -n || true
  done
  (run "$t" || touch "artifacts/$t.failed") &
done
wait
failed=()
for t in "${targets[@]}"; do
  [ -e "artifacts/$t.failed" ] && failed+=("$t")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: all ${#targets[@]} targets ok"
