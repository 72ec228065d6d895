#!/usr/bin/env bash
# GPU tuning round (issue 10): contrastive tests on CUDA, the engine table at N=32768 D=256 bf16, the
# eager / torch.compile baselines at the same size, and the paper-size presets of the other targets.
# Everything lands in $OUT/tune.tgz plus $OUT/tune.log (the device tool returns at most 8 files).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-${OUT:-gpu_tune_out}}"; w="$(mktemp -d)"; mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1; unset TRITON_INTERPRET
py="${PYTHON:-python3}"
run() { local lim="$1"; shift; echo "### $* (limit ${lim}s)"; local t0=$SECONDS; timeout "$lim" "$@"; echo "### exit $? after $((SECONDS - t0))s"; }
{
run 150 env SSLKERNELS_POISON=1 "$py" -m pytest -q -x -n 8 -p no:cacheprovider tests/test_ops_contrastive.py tests/test_contrastive_api.py
run 240 env OUT="$w" "$py" benchmarks/contrastive_engines.py
run 60 env OUT="$w/s100" SCALE100=1 OPS=clip_loss ENGINES=v2-online,v2-fixed "$py" benchmarks/contrastive_engines.py
run 120 "$py" -m sslkernels.bench info_nce clip_loss --sizes N=32768:M=32768:D=256 --dtype bf16 --impl eager,compile --out "$w/baselines"
run 150 "$py" -m sslkernels.bench moco_loss ema_update_ dino_loss --sizes paper --impl ours,eager,compile,peers --out "$w/paper"
} 2>&1 | tee "$out/tune.log"
tar czf "$out/tune.tgz" -C "$w" .
