#!/usr/bin/env bash
# Writes a small seed corpus for every fuzz target into fuzz/corpus/<target>/ (git-ignored),
# made with qemu-img (test-only tool) plus a hand-made ISO. Idempotent.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/corpus}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
q() { qemu-img "$@" >/dev/null; }

# A small source disk with some data in it.
truncate -s 4M "$tmp/src.raw"
head -c 65536 /dev/urandom | dd of="$tmp/src.raw" conv=notrunc bs=64k seek=3 status=none
printf 'hello' | dd of="$tmp/src.raw" conv=notrunc bs=1 seek=1048576 status=none

mk() { # target name fmt opts
  mkdir -p "$out/$1"
  q convert -f raw -O "$3" ${4:+-o "$4"} "$tmp/src.raw" "$tmp/$2"
  cp "$tmp/$2" "$out/$1/$2"
}
mk inspect_qcow2 v3.qcow2 qcow2 cluster_size=4k
mk inspect_qcow2 v2.qcow2 qcow2 compat=0.10,cluster_size=4k
mk inspect_qcow2 extl2.qcow2 qcow2 extended_l2=on,cluster_size=16k
q convert -c -f raw -O qcow2 -o cluster_size=4k,compression_type=zstd "$tmp/src.raw" "$out/inspect_qcow2/zstd.qcow2"
q create -f qcow2 -o cluster_size=4k -b "$tmp/src.raw" -F raw "$out/inspect_qcow2/backing.qcow2"
mk inspect_vmdk sparse.vmdk vmdk subformat=monolithicSparse
mk inspect_vmdk stream.vmdk vmdk subformat=streamOptimized
q create -f vmdk -o subformat=monolithicFlat "$tmp/flat.vmdk" 1M
cp "$tmp/flat.vmdk" "$out/inspect_vmdk/descriptor.vmdk"
mk inspect_vhd dynamic.vhd vpc subformat=dynamic
q create -f vpc -o subformat=fixed "$tmp/fixed.vhd" 64k
cp "$tmp/fixed.vhd" "$out/inspect_vhd/fixed.vhd"
mk inspect_vhdx small.vhdx vhdx block_size=1M,log_size=1M
mk inspect_qed_vdi small.qed qed cluster_size=4k
mk inspect_qed_vdi small.vdi vdi
mkdir -p "$out/inspect_iso"
python3 - "$out/inspect_iso/mini.iso" <<'PY'
import struct, sys
b = bytearray(64 * 1024)
b[0x8000] = 1; b[0x8001:0x8007] = b"CD001\x01"
b[0x8000 + 80:0x8000 + 88] = struct.pack("<I", 32) + struct.pack(">I", 32)
b[0x8000 + 128:0x8000 + 132] = struct.pack("<H", 2048) + struct.pack(">H", 2048)
b[0x8800] = 255; b[0x8801:0x8807] = b"CD001\x01"
open(sys.argv[1], "wb").write(b)
PY
# Reader targets: the same kinds of files, plus what only a reader exercises (compressed
# clusters with both algorithms and several cluster sizes, streamOptimized grains, VDI static).
mk read_qcow2 v3.qcow2 qcow2 cluster_size=4k
mk read_qcow2 v2.qcow2 qcow2 compat=0.10,cluster_size=4k
mk read_qcow2 c512.qcow2 qcow2 cluster_size=512
for c in zlib zstd; do
  for cs in 512 4k 64k; do
    q convert -c -f raw -O qcow2 -o cluster_size=$cs,compression_type=$c "$tmp/src.raw" \
      "$out/read_qcow2/$c-$cs.qcow2"
  done
done
q convert -c -f raw -O qcow2 -o compat=0.10,cluster_size=4k "$tmp/src.raw" "$out/read_qcow2/v2-zlib.qcow2"
mk read_vhd dynamic.vhd vpc subformat=dynamic
cp "$tmp/fixed.vhd" "$out/read_vhd/fixed.vhd"
mk read_vhdx small.vhdx vhdx block_size=1M,log_size=1M
mk read_vmdk sparse.vmdk vmdk subformat=monolithicSparse
mk read_vmdk stream.vmdk vmdk subformat=streamOptimized
cp "$tmp/flat.vmdk" "$out/read_vmdk/descriptor.vmdk"
mk read_vdi dynamic.vdi vdi
truncate -s 1M "$tmp/small.raw"
printf 'hello' | dd of="$tmp/small.raw" conv=notrunc bs=1 seek=4096 status=none
q convert -f raw -O vdi -o static=on "$tmp/small.raw" "$out/read_vdi/static.vdi"
mkdir -p "$out/read_any"
for d in read_qcow2 read_vmdk read_vhd read_vdi inspect_iso; do
  for f in "$out/$d"/*; do
    [ "$(stat -c %s "$f")" -le 1048576 ] && cp "$f" "$out/read_any/"
  done
done
cp "$tmp/small.raw" "$out/read_any/small.raw"

mkdir -p "$out/inspect_any"
for d in inspect_qcow2 inspect_vmdk inspect_vhd inspect_qed_vdi inspect_iso; do
  for f in "$out/$d"/*; do
    [ "$(stat -c %s "$f")" -le 1048576 ] && cp "$f" "$out/inspect_any/"
  done
done
echo "seeds written to $out"
du -sh "$out"/* | sed 's/^/  /'
