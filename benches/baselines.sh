# Disk baselines shared by the benchmarks (sourced). Sets, in MB/s, and prints:
# - DD_MBS: dd writing 1 GiB with O_DIRECT and fsync (the disk's sequential write speed);
# - COPY_MBS: dd reading that file and writing it back, both O_DIRECT (a copy that reads, then
#   writes, every byte on this one disk);
# - PAR_MBS: one dd reading 1 GiB while another writes 1 GiB, both O_DIRECT, timed until both
#   finish (the ceiling of a pipelined copy that overlaps its reads and writes: what an import
#   of new data or an encrypting copy can reach at best on this one disk).
# The random source file is synced before any measurement, so its write-back does not fall
# into one. Usage: disk_baselines WORKDIR
disk_baselines() {
  local work=$1 out t0 t1
  dd if=/dev/urandom of="$work/rand" bs=4M count=256 status=none
  sync "$work/rand"
  out=$(dd if="$work/rand" of="$work/dd.out" bs=4M oflag=direct conv=fsync 2>&1 | tail -1 | awk -F', ' '{print $NF}')
  echo "dd write 1 GiB O_DIRECT: $out"
  DD_MBS=$(echo "$out" | awk '{v=$1; if ($2 ~ /^GB/) v*=1000; print v}')
  out=$(dd if="$work/dd.out" of="$work/dd.copy" bs=4M iflag=direct oflag=direct conv=fsync 2>&1 | tail -1 | awk -F', ' '{print $NF}')
  echo "dd copy 1 GiB (read + write, O_DIRECT): $out"
  COPY_MBS=$(echo "$out" | awk '{v=$1; if ($2 ~ /^GB/) v*=1000; print v}')
  rm -f "$work/dd.copy"
  t0=$(date +%s.%N)
  dd if="$work/dd.out" of=/dev/null bs=4M iflag=direct status=none &
  dd if="$work/rand" of="$work/dd.par" bs=4M oflag=direct conv=fsync status=none
  wait
  t1=$(date +%s.%N)
  PAR_MBS=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", 1073.741824 / (b - a) }')
  echo "dd read 1 GiB while dd writes 1 GiB (O_DIRECT, both finished): $PAR_MBS MB/s"
  rm -f "$work/rand" "$work/dd.out" "$work/dd.par"
}
