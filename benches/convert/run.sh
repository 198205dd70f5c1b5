#!/usr/bin/env bash
# Times our converter (crates/format/examples/convert.rs) against qemu-img on the same
# images in the same invocation, and prints ours/qemu-img time ratios and peak RSS.
#
# Image: 4 GiB virtual disk with 1 GiB of random data in 16 x 64 MiB runs (sparse elsewhere),
# as raw (src.raw) and qcow2 (src.qcow2, made by qemu-img).
#
# Needs: qemu-img, GNU time (/usr/bin/time; `apt-get install -y time` if missing), cargo.
# Env: BENCH_DIR (default /tmp/oims-bench-convert), REPS (default 5) for uncompressed runs,
#      CREPS (default 1) for compressed runs, CARGO_TARGET_DIR (as usual).
# Fairness: every pair runs qemu-img first, then ours, on the same cached source; a warm-up
# qemu-img run precedes all; before each run the output is deleted and `sync` flushes dirty
# pages (so neither run pays for the other's writeback); the median of REPS is reported,
# with CPU time (user+sys), which is far less noisy than wall time on a shared machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v qemu-img >/dev/null || { echo "qemu-img is required" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "GNU time missing: apt-get install -y time" >&2; exit 1; }

DIR=${BENCH_DIR:-/tmp/oims-bench-convert}
REPS=${REPS:-5}
CREPS=${CREPS:-1}
mkdir -p "$DIR"
cargo build --release -q -p openims-format --example convert
TARGET=${CARGO_TARGET_DIR:-target}
OURS="$TARGET/release/examples/convert"

if [ ! -f "$DIR/src.qcow2" ]; then
  echo "creating 4 GiB image with 1 GiB random data in $DIR ..." >&2
  rm -f "$DIR/src.raw"
  truncate -s 4G "$DIR/src.raw"
  for i in $(seq 0 15); do
    dd if=/dev/urandom of="$DIR/src.raw" bs=1M count=64 seek=$((i * 256)) conv=notrunc status=none
  done
  qemu-img convert -f raw -O qcow2 "$DIR/src.raw" "$DIR/src.qcow2"
fi
# Compressible image: 4 GiB virtual with 512 MiB of system files (tar of /usr, ~2-3x
# compressible) in 16 x 32 MiB runs, so compression itself is measured, not only skipping.
if [ ! -f "$DIR/usr.qcow2" ]; then
  echo "creating 4 GiB image with 512 MiB of /usr content ..." >&2
  rm -f "$DIR/usr.raw"
  truncate -s 4G "$DIR/usr.raw"
  tar cf - /usr 2>/dev/null | head -c $((512 << 20)) > "$DIR/usr.tar" || true
  for i in $(seq 0 15); do
    dd if="$DIR/usr.tar" of="$DIR/usr.raw" bs=1M count=32 skip=$((i * 32)) seek=$((i * 256)) conv=notrunc status=none
  done
  rm -f "$DIR/usr.tar"
  qemu-img convert -f raw -O qcow2 "$DIR/usr.raw" "$DIR/usr.qcow2"
  rm -f "$DIR/usr.raw"
fi

# t CMD... -> prints "seconds maxrss_kib user sys"
t() {
  /usr/bin/time -f "%e %M %U %S" -o "$DIR/.time" "$@" >/dev/null 2>"$DIR/.err" || { cat "$DIR/.err" >&2; exit 1; }
  cat "$DIR/.time"
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# pair NAME REPS "QEMU ARGS" "OUR ARGS" OUTFILE
pair() {
  local name=$1 reps=$2 qargs=$3 oargs=$4 out=$5 qt=() ot=() qc=() oc=() qm=0 om=0 r rc qs=0 os=0 s m u y
  for _ in $(seq 1 "$reps"); do
    rm -f "$out"; sync
    read -r s m u y < <(t qemu-img convert $qargs "$out"); qt+=("$s"); qm=$((m > qm ? m : qm))
    qc+=("$(awk -v u="$u" -v y="$y" 'BEGIN {print u + y}')"); qs=$(stat -c %s "$out")
    rm -f "$out"; sync
    read -r s m u y < <(t "$OURS" $oargs "$out"); ot+=("$s"); om=$((m > om ? m : om))
    oc+=("$(awk -v u="$u" -v y="$y" 'BEGIN {print u + y}')"); os=$(stat -c %s "$out")
  done
  local q o qcpu ocpu
  q=$(printf '%s\n' "${qt[@]}" | median)
  o=$(printf '%s\n' "${ot[@]}" | median)
  qcpu=$(printf '%s\n' "${qc[@]}" | median)
  ocpu=$(printf '%s\n' "${oc[@]}" | median)
  r=$(awk -v o="$o" -v q="$q" 'BEGIN {printf "%.2f", o / q}')
  rc=$(awk -v o="$ocpu" -v q="$qcpu" 'BEGIN {printf "%.2f", (q > 0 ? o / q : 0)}')
  printf '| %-30s | %7.2f | %7.2f | **%s** | %6.2f | %6.2f | %s | %4d | %4d | %5d | %5d |\n' \
    "$name" "$q" "$o" "$r" "$qcpu" "$ocpu" "$rc" $((qm / 1024)) $((om / 1024)) $((qs >> 20)) $((os >> 20))
  rm -f "$out"
}

echo "warm-up ..." >&2
qemu-img convert -f qcow2 -O raw "$DIR/src.qcow2" "$DIR/warm.raw"; rm -f "$DIR/warm.raw"
cat "$DIR/src.raw" > /dev/null

echo "| conversion | qemu-img wall s | ours wall s | wall ratio | qemu-img CPU s | ours CPU s | CPU ratio | qemu RSS MiB | our RSS MiB | qemu out MiB | our out MiB |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
S="$DIR/src.qcow2"; R="$DIR/src.raw"; O="$DIR/out"
pair "qcow2 -> raw"               "$REPS"  "-f qcow2 -O raw $S"                           "$S -O raw"       "$O.raw"
pair "raw -> qcow2"               "$REPS"  "-f raw -O qcow2 $R"                           "$R -O qcow2"     "$O.qcow2"
pair "qcow2 -> vhd (dynamic)"     "$REPS"  "-f qcow2 -O vpc $S"                           "$S -O vhd"       "$O.vhd"
pair "qcow2 -> vmdk streamOpt."   "$CREPS" "-f qcow2 -O vmdk -o subformat=streamOptimized $S" "$S -O vmdk" "$O.vmdk"
pair "qcow2 -> qcow2 compressed"  "$CREPS" "-f qcow2 -O qcow2 -c $S"                      "$S -O qcow2 -c"  "$O.c.qcow2"
U="$DIR/usr.qcow2"
cat "$U" > /dev/null
pair "usr: qcow2 -> vmdk streamOpt." "$CREPS" "-f qcow2 -O vmdk -o subformat=streamOptimized $U" "$U -O vmdk" "$O.vmdk"
pair "usr: qcow2 -> qcow2 compr."  "$CREPS" "-f qcow2 -O qcow2 -c $U"                      "$U -O qcow2 -c"  "$O.c.qcow2"
echo "cores: $(nproc); load average: $(cut -d' ' -f1-3 /proc/loadavg); qemu-img: $(qemu-img --version | head -1)"
