#!/usr/bin/env bash
# Between two device calls of scripts/gpu_tune.sh: put the bench parts (targets, full-a, full-b, full-c, sweep)
# of the returned tune.tgz where the next call resumes them, and say which are still incomplete. Quick on
# purpose: a lent GPU goes back after ~30 s idle, and a fresh one costs minutes of start-up.
#   bash scripts/gpu_parts.sh PATH/tune.tgz [PARTS_DIR]     (PARTS_DIR: gpu_tune's TUNE_PARTS default,
#                                                           benchmarks/results/<gpu>/parts, <gpu> read from the tarball)
set -euo pipefail
tgz="$(realpath -e "$1")"  # before the cd: a path relative to the caller's folder had read as no parts at all
cd "$(dirname "${BASH_SOURCE[0]}")/.."
gpu="$(tar xzf "$tgz" -O ./gpu 2>/dev/null || echo gpu)"; parts="${2:-benchmarks/results/$gpu/parts}"
mkdir -p "$parts"
new="$(mktemp -d)"; found=0
for name in targets full-a full-b full-c sweep; do
  if tar tzf "$tgz" "./$name/results.json" >/dev/null 2>&1; then
    found=$((found + 1))
    tar xzf "$tgz" -C "$new" "./$name"
    # Read before replacing: a results.json cut off by the call's limit must not replace the last whole one.
    if ! pending=$(python3 -c "import json,sys; print(sum(1 for r in json.load(open(sys.argv[1]))['results'] if r.get('pending')))" \
                   "$new/$name/results.json" 2>/dev/null); then
      echo "$name: the returned results.json does not read; $parts/$name kept as it was"; continue
    fi
    rm -rf "${parts:?}/$name" && mv "$new/$name" "$parts/$name"
    echo "$name: $([ "$pending" = 0 ] && echo complete || echo "$pending records pending (resumed by the next call)")"
  fi
done
rm -rf "$new"
(( found )) || echo "no bench part (targets, full-a, full-b, full-c, sweep) in $tgz: nothing to resume"
