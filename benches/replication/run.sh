#!/usr/bin/env bash
# Replication benchmark: O(1) in-region copies (1 GiB and 100 GiB) and streaming encryption
# (4 GiB image, 1 GiB data), with openssl and dd baselines measured in the same run.
# Usage: benches/replication/run.sh [WORKDIR]   (default /tmp/oims-bench-replication)
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-/tmp/oims-bench-replication}
PROFILE=${PROFILE:-dev}          # dev = deps and the store at opt-level 2 (see Cargo.toml)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/openims-target}
rm -rf "$WORK" && mkdir -p "$WORK"

if [ "$PROFILE" = release ]; then
  cargo build -q --release -p openims-core --example replication_bench
  BIN=$CARGO_TARGET_DIR/release/examples/replication_bench
else
  cargo build -q --example replication_bench
  BIN=$CARGO_TARGET_DIR/debug/examples/replication_bench
fi

echo "== baselines"
AES=$(openssl speed -evp aes-256-gcm -seconds 2 2>/dev/null | awk 'tolower($1)=="aes-256-gcm" {v=$NF; sub("k","",v); print v/1000}')
echo "openssl aes-256-gcm (16 KiB blocks, 1 core): ${AES} MB/s"
DD_OUT=$(dd if=/dev/urandom of="$WORK/rand" bs=4M count=256 status=none && \
         dd if="$WORK/rand" of="$WORK/dd.out" bs=4M oflag=direct conv=fsync 2>&1 | tail -1)
rm -f "$WORK/rand" "$WORK/dd.out"
DD=$(echo "$DD_OUT" | awk -F', ' '{print $NF}')
echo "dd write 1 GiB O_DIRECT: $DD"
DD_MBS=$(echo "$DD" | awk '{v=$1; if ($2 ~ /^GB/) v*=1000; print v}')

echo "== openims"
/usr/bin/time -v "$BIN" "$WORK/data" --sizes-gib 1,100 --data-gib 1 --virtual-gib 4 --runs 5 \
  2> "$WORK/time.txt" | tee "$WORK/results.jsonl"
grep -E "Maximum resident" "$WORK/time.txt" || true

python3 - "$WORK/results.jsonl" "$AES" "$DD_MBS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
aes, dd = float(sys.argv[2]), float(sys.argv[3])
low = min(aes, dd)
print(f"\nbaseline min(AES {aes:.0f}, dd {dd:.0f}) = {low:.0f} MB/s; target >= {0.6*low:.0f} MB/s")
for r in rows:
    if r["bench"] == "o1_copy":
        ok = "OK" if r["median_ms"] < 50 else "SLOW"
        print(f"o1 copy {r['case']:<14} {r['virtual_gib']:>4} GiB ({r['chunks']} chunks): "
              f"median {r['median_ms']:.1f} ms (min {r['min_ms']:.1f}, max {r['max_ms']:.1f}) {ok}")
    else:
        ratio = r["data_mb_s"] / low
        print(f"{r['bench']:<18} {r['data_bytes']>>20} MiB data in {r['virtual_gib']} GiB: "
              f"{r['seconds']:.2f} s, {r['data_mb_s']:.0f} MB/s = {ratio:.2f} x baseline")
PY
