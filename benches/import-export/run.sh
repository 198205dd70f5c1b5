#!/usr/bin/env bash
# Import/export benchmark: a qcow2 file (4 GiB virtual, 1 GiB data) imported from the embedded
# bucket and exported back to it as qcow2 (chunks shared) and vhd (streamed), as MB/s of data, next to the disk baselines
# of benches/baselines.sh (dd write, dd copy, dd read and write overlapped)
# measured in the same run; then the same with a 20 GiB image (1 GiB data) for peak RSS.
# Usage: benches/import-export/run.sh [WORKDIR]   (default /tmp/oims-bench-import-export)
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-/tmp/oims-bench-import-export}
PROFILE=${PROFILE:-dev}          # dev = deps, store and format at opt-level 2 (see Cargo.toml)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/openims-target}
PY=${PY:-$HOME/.cache/openims-venv/bin/python}
rm -rf "$WORK" && mkdir -p "$WORK"
if [ "$PROFILE" = release ]; then
  cargo build -q --release --bin openims; BIN=$CARGO_TARGET_DIR/release/openims
else
  cargo build -q --bin openims; BIN=$CARGO_TARGET_DIR/debug/openims
fi

echo "== baseline"
source benches/baselines.sh
disk_baselines "$WORK"

echo "== openims ($PROFILE)"
"$PY" benches/import-export/bench.py "$WORK" "$BIN" 4 1 | tee "$WORK/results.jsonl"
"$PY" benches/import-export/bench.py "$WORK" "$BIN" 20 1 | tee -a "$WORK/results.jsonl"

"$PY" - "$WORK/results.jsonl" "$DD_MBS" "$COPY_MBS" "$PAR_MBS" <<'PY'
import json, sys
dd, copy, par = float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
print(f"\nbaseline dd {dd:.0f} MB/s; target >= {0.7*dd:.0f} MB/s; RSS target < 200 MiB at 20 GiB")
print(f"dd copy (read, then write, every byte): {copy:.0f} MB/s; dd read and write overlapped "
      f"(the disk's ceiling for a job that reads and writes every byte): {par:.0f} MB/s = {par/dd:.2f} x dd")
for l in open(sys.argv[1]):
    r = json.loads(l)
    print(f"{r['virtual_gib']:>3} GiB image, {r['data_bytes']>>20} MiB data: upload {r['upload_s']} s, import {r['import_s']} s (server CPU {r['import_cpu_s']} s) = "
          f"{r['import_mb_s']} MB/s ({r['import_mb_s']/dd:.2f} x dd, {r['import_mb_s']/copy:.2f} x copy, {r['import_mb_s']/par:.2f} x overlapped), export {r['export_s']} s = "
          f"{r['export_mb_s']} MB/s ({r['export_mb_s']/dd:.2f} x dd), export vhd {r['vhd_s']} s = "
          f"{r['vhd_mb_s']} MB/s ({r['vhd_mb_s']/dd:.2f} x dd, {r['vhd_mb_s']/copy:.2f} x copy, {r['vhd_mb_s']/par:.2f} x overlapped), peak RSS {r['peak_rss_mib']} MiB "
          f"(upload {r['upload_rss_mib']}, import {r['import_rss_mib']}, export {r['export_rss_mib']}, vhd {r['vhd_rss_mib']})")
    if r.get("raw_import_s") is not None:
        print(f"    raw file in 8 MiB parts, imported by reference: {r['raw_import_s']} s")
PY
