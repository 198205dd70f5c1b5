#!/usr/bin/env bash
# benches/api: requests/second and p50/p99 latency of signed GET /v2/cloudimages (1,000 images)
# and GET /v2/images/{id}, against the release binary on loopback.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/openims-target}
secs=${SECS:-10}
conc=${CONC:-32}
(cd "$root" && cargo build --release --bin openims -q)
(cd "$here/loadgen" && cargo build --release -q)
bin=$CARGO_TARGET_DIR/release/openims
gen=$CARGO_TARGET_DIR/release/openims-loadgen
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
RUST_LOG=warn "$bin" serve --data-dir "$dir" --listen 127.0.0.1:$port --image-quota 5000 > "$dir/log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do curl -sf http://127.0.0.1:$port/healthz >/dev/null && break; sleep 0.1; done
set -a; . "$dir/credentials"; set +a
ep=http://127.0.0.1:$port
"$gen" seed "$ep" "$OPENIMS_ACCESS_KEY" "$OPENIMS_SECRET_KEY" "$OPENIMS_PROJECT_ID" 1000
id=$("$gen" first-image "$ep" "$OPENIMS_ACCESS_KEY" "$OPENIMS_SECRET_KEY" "$OPENIMS_PROJECT_ID")
echo "nproc=$(nproc) secs=$secs concurrency=$conc images=1000 (load generator shares the machine)"
for path in "/v2/cloudimages?limit=25" "/v2/cloudimages" "/v2/images/$id"; do
  "$gen" run "$ep" "$OPENIMS_ACCESS_KEY" "$OPENIMS_SECRET_KEY" "$OPENIMS_PROJECT_ID" "$path" "$secs" "$conc"
done
echo "peak RSS of the server (KiB): $(grep VmHWM /proc/$pid/status | awk '{print $2}')"
