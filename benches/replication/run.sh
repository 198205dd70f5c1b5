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
source benches/baselines.sh
disk_baselines "$WORK"

echo "== openims"
/usr/bin/time -v "$BIN" "$WORK/data" --sizes-gib 1,100 --data-gib 1 --virtual-gib 4 --runs 5 --stream-runs 3 \
  2> "$WORK/time.txt" | tee "$WORK/results.jsonl"
grep -E "Maximum resident" "$WORK/time.txt" || true

python3 - "$WORK/results.jsonl" "$AES" "$DD_MBS" "$COPY_MBS" "$PAR_MBS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
aes, dd, copy, par = float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
low = min(aes, dd)
print(f"\nbaseline min(AES {aes:.0f}, dd {dd:.0f}) = {low:.0f} MB/s; target >= {0.6*low:.0f} MB/s")
print(f"dd copy (read, then write, every byte): {copy:.0f} MB/s; dd read and write overlapped "
      f"(the disk's ceiling for a job that reads and writes every byte): {par:.0f} MB/s = {par/dd:.2f} x dd")
for r in rows:
    if r["bench"] == "o1_copy":
        ok = "OK" if r["median_ms"] < 50 else "SLOW"
        print(f"o1 copy {r['case']:<14} {r['virtual_gib']:>4} GiB ({r['chunks']} chunks): "
              f"median {r['median_ms']:.1f} ms (min {r['min_ms']:.1f}, max {r['max_ms']:.1f}) {ok}")
streams = {}
for r in rows:
    if r["bench"] != "o1_copy":
        streams.setdefault(r["bench"], []).append(r)
for bench, rs in streams.items():
    rates = sorted(r["data_mb_s"] for r in rs)
    med = rates[len(rates) // 2]
    print(f"{bench:<18} {rs[0]['data_bytes']>>20} MiB data in {rs[0]['virtual_gib']} GiB, {len(rs)} runs: "
          f"median {med:.0f} MB/s (min {rates[0]:.0f}, max {rates[-1]:.0f}) = {med / low:.2f} x baseline, "
          f"{med / copy:.2f} x dd copy, {med / par:.2f} x overlapped")
PY
