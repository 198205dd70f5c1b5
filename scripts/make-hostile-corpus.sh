#!/usr/bin/env bash
# Writes the hostile image corpus (files every upload path must refuse) into DIR, with
# DIR/expected.json: [{"file", "expected": [violation names], "declared_format", "description"}].
# Helper files (backing files, flat extents, sources) go to DIR/support/ and are not corpus files.
# Needs qemu-img. Usage: scripts/make-hostile-corpus.sh DIR
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 DIR" >&2
  exit 2
fi
mkdir -p "$1"
dir=$(cd "$1" && pwd)
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
HOSTILE_CORPUS_DIR="$dir" cargo test -q -p openims-format --test hostile_corpus \
  -- --exact write_corpus_to_dir --nocapture
test -s "$dir/expected.json"
