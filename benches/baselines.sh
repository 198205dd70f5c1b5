# Disk baselines shared by the benchmarks (sourced): sets DD_MBS (dd writing 1 GiB with O_DIRECT
# and fsync: the disk's sequential write speed) and COPY_MBS (dd reading that file and writing
# it back, both O_DIRECT: the ceiling of any copy that reads and writes every byte on this one
# disk), in MB/s, and prints both. Usage: disk_baselines WORKDIR
disk_baselines() {
  local work=$1 out
  dd if=/dev/urandom of="$work/rand" bs=4M count=256 status=none
  out=$(dd if="$work/rand" of="$work/dd.out" bs=4M oflag=direct conv=fsync 2>&1 | tail -1 | awk -F', ' '{print $NF}')
  echo "dd write 1 GiB O_DIRECT: $out"
  DD_MBS=$(echo "$out" | awk '{v=$1; if ($2 ~ /^GB/) v*=1000; print v}')
  out=$(dd if="$work/dd.out" of="$work/dd.copy" bs=4M iflag=direct oflag=direct conv=fsync 2>&1 | tail -1 | awk -F', ' '{print $NF}')
  echo "dd copy 1 GiB (read + write, O_DIRECT): $out"
  COPY_MBS=$(echo "$out" | awk '{v=$1; if ($2 ~ /^GB/) v*=1000; print v}')
  rm -f "$work/rand" "$work/dd.out" "$work/dd.copy"
}
