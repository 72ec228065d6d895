#!/usr/bin/env bash
# One command for a GPU machine: build csrc, run the whole test suite on CUDA tensors (GPU-only tests
# included), run the quick GPU benchmark preset, and leave logs + JSON under an output folder.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        (or OUT=... ; the device tool sets $OUT)
#
# Works offline with whatever torch/triton the machine has (PYTHONPATH=., no pip install), so it runs
# on the device image (torch 2.11 / triton 3.6) as well as in the project's pinned venv. Each stage has
# its own time limit so the whole stays well inside 10 minutes; a failing stage does not stop the rest,
# and the exit code is non-zero if any stage failed.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${1:-${OUT:-$root/gpu_check_out}}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$PATH:/usr/local/cuda/bin"
unset TRITON_INTERPRET
# Peers and drop-in originals carried as wheels (scripts/peer_wheels.sh, `carry: [".whl"]`): installed into a
# scratch folder without network, so the drop-in tests and the bench's peers run on the GPU too.
# (Once per machine: gpu_tune.sh, which runs this script, has installed them already.)
if ls .whl/*.whl >/dev/null 2>&1 && [[ ":$PYTHONPATH:" != *":/tmp/site:"* ]]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

# The device tool returns at most 8 files from $OUT: stage logs go to a scratch folder (GPU_CHECK_LOGS, where
# scripts/gpu_tune.sh keeps them in its tarball) and are appended whole to gpu_check.log; $OUT keeps
# gpu_check.log, summary.md, tests.xml and bench.tgz (the bench's folder). GPU_CHECK_STAGES runs some of the stages only.
logs="${GPU_CHECK_LOGS:-$(mktemp -d)}"; mkdir -p "$logs"
stages="${GPU_CHECK_STAGES:-env build_csrc tests bench}"
# GPU_CHECK_S: the whole script's seconds (gpu_tune.sh sets it): each stage's limit shrinks to what is left. A
# `timeout` around this script would not reach a stage's own `timeout` (a process group of its own), whose
# pytest would then run on into the caller's next step.
total_s="${GPU_CHECK_S:-100000}"
declare -A status seconds
stage() {  # stage NAME LIMIT_S CMD...
  local name="$1" limit="$2"; shift 2
  [[ " $stages " == *" $name "* ]] || return 0
  local rest=$((total_s - SECONDS - 5)); (( rest < limit )) && limit=$rest
  if (( limit < 10 )); then echo "=== $name: not started, ${SECONDS}s of ${total_s}s gone"; return 0; fi
  local t0=$SECONDS
  timeout "$limit" "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  status[$name]=$rc; seconds[$name]=$((SECONDS - t0))
  { echo "=== $name: exit $rc after ${seconds[$name]}s (limit ${limit}s): $*"; cat "$logs/$name.log"; } >>"$out/gpu_check.log"
  echo "=== $name: exit $rc, ${seconds[$name]}s"; grep -E '^(FAILED|ERROR) ' "$logs/$name.log" | head -n 30; tail -n 3 "$logs/$name.log"
}

: >"$out/gpu_check.log"
stage env 60 bash -c "nvidia-smi; $py -c 'import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0))'"
stage build_csrc 90 env PYTHON="$py" bash scripts/build_csrc.sh "$root/build/csrc"
# Kernel outputs are NaN-poisoned before launch (ops/_common.py), so an unwritten element fails a test.
# pytest-xdist (in the device image) spreads the suite over 8 workers (of 16 cores) sharing the GPU: Triton's
# compiles run on the host.
xdist=(); "$py" -c 'import xdist' 2>/dev/null && xdist=(-n 8)
# One line per test as it ends (-v), so a stage cut off by its limit still says what failed and what ran; with
# pytest-timeout (in the image) a test that hangs fails after 120 s instead of stalling the rest.
hang=(); "$py" -c 'import pytest_timeout' 2>/dev/null && hang=(--timeout 120)
stage tests 300 env SSLKERNELS_POISON=1 "$py" -m pytest -v -rfE -p no:cacheprovider --durations 15 "${xdist[@]}" \
  "${hang[@]}" tests --junitxml="$out/tests.xml"
stage bench 180 "$py" -m sslkernels.bench --quick --device cuda --out "$logs/bench"
# The bench writes a dozen files (JSON, Markdown, CSV, plots): one tarball keeps $OUT within the device's 8.
[[ -d "$logs/bench" ]] && tar czf "$out/bench.tgz" -C "$logs" bench

{
  echo
  echo "| stage | exit | seconds | last line |"
  echo "| --- | --- | --- | --- |"
  for name in $stages; do
    last="$(tail -n 1 "$logs/$name.log" 2>/dev/null | tr '|' '/' | cut -c1-100)"
    echo "| $name | ${status[$name]:-skipped} | ${seconds[$name]:-0} | $last |"
  done
} | tee "$out/summary.md"
for name in $stages; do [ "${status[$name]:-1}" = 0 ] || exit 1; done
