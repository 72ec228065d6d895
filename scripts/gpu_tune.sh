#!/usr/bin/env bash
# GPU tuning round (issue 10): csrc build, the kernel tests on CUDA, autotuning of the contrastive engine
# at N=32768 D=256 bf16 (winners printed as "[sslkernels autotune] ..."), and the target-size benchmarks
# (contrastive at N=32768 D=256 bf16, moco/ema/dino paper presets) with eager, torch.compile and peers.
# Everything lands in $OUT/tune.tgz plus $OUT/tune.log (the device tool returns at most 8 files).
#   bash scripts/gpu_tune.sh [OUT_DIR]        (TUNE_STEPS="tests autotune bench" selects stages; also: engines,
#   contrastive, moco, dino (DINO + Sinkhorn at the paper / target sizes), variants (DINO's two-pass kernels vs
#   the gradient formed in the forward, over its launch settings), profile (host vs kernel time of a
#   DINO and a MoCo step), targets (every issue target's case, pass/fail), full-a / full-b / full-c (issue 8's
#   full paper preset in three parts; `python -m sslkernels.bench --merge` joins them), sweep (issue 8's
#   scaling sweep of info_nce and clip_loss over N))
# The bench parts (targets, full-a, full-b, full-c, sweep) run in whatever is left of this call's TUNE_CALL_S (570 s)
# and stop starting cases in time; a part an earlier call began resumes from $TUNE_PARTS/<part>/results.json
# (default benchmarks/results/h100/parts: unpack the earlier call's tune.tgz there first), so several calls
# with the same TUNE_STEPS finish the preset without measuring a case twice.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-${OUT:-gpu_tune_out}}"; w="$(mktemp -d)"; mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1; unset TRITON_INTERPRET
py="${PYTHON:-python3}"
steps="${TUNE_STEPS:-tests autotune bench}"
if ls .whl/*.whl >/dev/null 2>&1; then  # peers carried as wheels (scripts/peer_wheels.sh)
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
run() { local lim="$1"; shift; echo "### $* (limit ${lim}s)"; local t0=$SECONDS; timeout "$lim" "$@"; echo "### exit $? after $((SECONDS - t0))s"; }
parts="${TUNE_PARTS:-benchmarks/results/h100/parts}"; call_s="${TUNE_CALL_S:-570}"
part() {  # part NAME BENCH_ARGS...: no case starts in the last 90 s of the call; results.json is written after each
  local name="$1"; shift
  local left=$((call_s - SECONDS - 20))
  if (( left < 120 )); then echo "### $name: not started, ${SECONDS}s of this call's ${call_s}s are gone"; return; fi
  local resume=(); [[ -f "$parts/$name/results.json" ]] && resume=(--resume "$parts/$name/results.json")
  run "$left" "$py" -m sslkernels.bench "$@" --time-budget $((left - 90)) "${resume[@]}" --no-progress --out "$w/$name"
}
{
[[ $steps == *tests* ]] && run 60 env PYTHON="$py" bash scripts/build_csrc.sh build/csrc
[[ $steps == *tests* ]] && run 200 env SSLKERNELS_POISON=1 "$py" -m pytest -q -n 8 -p no:cacheprovider tests
[[ $steps == *autotune* ]] && run 200 env OUT="$w/autotune" SSLKERNELS_AUTOTUNE=1 OPS=info_nce,clip_loss,nt_xent ENGINES=v2-fixed REPS=5 "$py" benchmarks/contrastive_engines.py
[[ $steps == *engines* ]] && run 120 env OUT="$w" ENGINES="${ENGINES:-v2-online,v2-fixed}" "$py" benchmarks/contrastive_engines.py
[[ $steps == *bench* || $steps == *contrastive* ]] && run 150 "$py" -m sslkernels.bench info_nce clip_loss nt_xent --sizes N=32768:M=32768:D=256 --dtype bf16 --impl ours,eager,compile,peers --out "$w/contrastive"
[[ $steps == *bench* || $steps == *moco* ]] && run 90 "$py" -m sslkernels.bench moco_loss --sizes paper --dtype bf16 --impl ours,eager,compile --out "$w/moco"
[[ $steps == *bench* ]] && run 120 "$py" -m sslkernels.bench ema_update_ dino_loss --sizes paper --impl ours,eager,compile,peers --out "$w/paper"
[[ $steps == *dino* ]] && run 90 "$py" -m sslkernels.bench dino_loss --sizes dino --impl ours,eager,compile --out "$w/dino"
[[ $steps == *dino* ]] && run 90 "$py" -m sslkernels.bench sinkhorn_knopp --sizes B=1024:P=65536 --dtype bf16 --impl ours,eager,compile --out "$w/sinkhorn"
[[ $steps == *variants* ]] && run 170 "$py" benchmarks/dino_variants.py --budget 140 --out "$w/dino-variants"
[[ $steps == *profile* ]] && run 120 "$py" benchmarks/profile_step.py dino_loss --sizes dino --dtype fp32 --graph --out "$w/profile-dino"
[[ $steps == *profile* ]] && run 60 "$py" benchmarks/profile_step.py moco_loss clip_loss --sizes mocov2,N=4096:D=256 --dtype bf16 --graph --out "$w/profile-moco"
[[ $steps == *targets* ]] && part targets --sizes targets
# Issue 8's full paper preset in three parts (bf16 contrastive, the rest fp32); merge them afterwards on any
# machine: python -m sslkernels.bench --merge $TUNE_PARTS/full-{a,b,c}/results.json --out benchmarks/results/h100/full
[[ $steps == *full-a* ]] && part full-a info_nce clip_loss siglip_loss --sizes paper --dtype bf16
[[ $steps == *full-b* ]] && part full-b nt_xent supcon_loss moco_loss negative_cosine_similarity dino_loss update_center_ sinkhorn_knopp MemoryQueue.enqueue_ ema_update_ --sizes paper
[[ $steps == *full-c* ]] && part full-c barlow_twins_loss vicreg_loss similarity knn_topk rankme --sizes paper
# Issue 8's scaling sweep (time and memory against N, where each implementation runs out of memory or past 2 s a call)
[[ $steps == *sweep* ]] && part sweep info_nce clip_loss --sweep N --sizes N=1024:M=1024:D=256 --dtype bf16 --sweep-max 524288
} 2>&1 | tee "$out/tune.log"
tar czf "$out/tune.tgz" -C "$w" .
