#!/usr/bin/env bash
# GPU tuning round (issue 10), the steps run in the order TUNE_STEPS names them, inside one device call:
#   tests      scripts/gpu_check.sh's env, csrc build and whole suite on CUDA (its log, summary and junit XML)
#   autotune   the contrastive engine autotuned at N=32768 D=256 bf16 (winners printed "[sslkernels autotune] ...")
#   engines    the contrastive engine variants side by side (benchmarks/contrastive_engines.py)
#   bench      contrastive at N=32768 D=256 bf16, moco, EMA and DINO paper presets, with eager, compile and peers
#              (also one at a time: contrastive, moco)
#   dino       DINO and Sinkhorn at the paper / target sizes
#   variants   DINO's two-pass kernels against the gradient formed in the forward, over its launch settings
#   profile    host against kernel time of a DINO and a MoCo step
#   targets    every issue target's case, pass/fail                                      } bench parts: each runs in
#   full-a, full-b, full-c   issue 8's full paper preset in three parts                     } what is left of the call
#   sweep      issue 8's scaling sweep of info_nce and clip_loss over N                     } and resumes (below)
#
#   TUNE_STEPS="tests targets variants" bash scripts/gpu_tune.sh [OUT_DIR]    (default steps: "tests autotune bench")
#
# The device tool gives a call at most 600 s and a session 15 device-minutes, so every step's limit shrinks to
# what is left of TUNE_CALL_S (570 s) and a step with under 30 s left is skipped: put the steps in order of worth.
# A bench part stops starting cases 90 s before the end, writes results.json after every case, and resumes from
# $TUNE_PARTS/<part>/results.json (default benchmarks/results/<gpu>/parts, <gpu> as "h200": after a call, unpack
# its tune.tgz there with scripts/gpu_parts.sh), so repeating a step list never measures a case twice.
# Everything lands in $OUT/tune.tgz, $OUT/tune.log and $OUT/summary.md (the device tool returns at most 8 files).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-${OUT:-gpu_tune_out}}"; w="$(mktemp -d)"; mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1; unset TRITON_INTERPRET
py="${PYTHON:-python3}"
steps="${TUNE_STEPS:-tests autotune bench}"
if ls .whl/*.whl >/dev/null 2>&1; then  # peers carried as wheels (scripts/peer_wheels.sh)
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
# The GPU's short name ("h100", "h200") names its results folder; tune.tgz carries it for gpu_parts.sh.
gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | grep -oE '\b[A-Z][0-9]{2,4}\b' | head -n 1 | tr 'A-Z' 'a-z')"
gpu="${gpu:-gpu}"; echo "$gpu" >"$w/gpu"
parts="${TUNE_PARTS:-benchmarks/results/$gpu/parts}"; call_s="${TUNE_CALL_S:-570}"
summary=()
left() { echo $((call_s - SECONDS - 20)); }  # 20 s kept for packing up
run() {  # run NAME LIMIT CMD...: LIMIT shrinks to what is left of the call
  local name="$1" lim="$2"; shift 2
  local rest; rest=$(left); (( rest < lim )) && lim=$rest
  if (( lim < 30 )); then
    echo "### $name: not started, ${SECONDS}s of this call's ${call_s}s are gone"; summary+=("| $name | skipped | 0 |"); return
  fi
  echo "### $name: $* (limit ${lim}s)"; local t0=$SECONDS
  timeout "$lim" "$@"; local rc=$?
  echo "### $name: exit $rc after $((SECONDS - t0))s"; summary+=("| $name | $rc | $((SECONDS - t0)) |")
}
part() {  # part NAME BENCH_ARGS...: no case starts in the last 90 s of the call; results.json is written after each
  local name="$1"; shift
  local rest; rest=$(left)
  if (( rest < 120 )); then
    echo "### $name: not started, ${SECONDS}s of this call's ${call_s}s are gone"; summary+=("| $name | skipped | 0 |"); return
  fi
  local resume=(); [[ -f "$parts/$name/results.json" ]] && resume=(--resume "$parts/$name/results.json")
  run "$name" "$rest" "$py" -m sslkernels.bench "$@" --time-budget $((rest - 90)) "${resume[@]}" --no-progress --out "$w/$name"
}
{
for step in $steps; do
  case "$step" in
    # gpu_check's own stages stop inside GPU_CHECK_S: the outer limit (10 s later) is only a backstop.
    tests) run tests 330 env GPU_CHECK_STAGES="env build_csrc tests" GPU_CHECK_LOGS="$w/tests/stages" PYTHON="$py" \
             GPU_CHECK_S=$(( $(left) < 330 ? $(left) - 10 : 320 )) bash scripts/gpu_check.sh "$w/tests" ;;
    autotune) run autotune 200 env OUT="$w/autotune" SSLKERNELS_AUTOTUNE=1 OPS=info_nce,clip_loss,nt_xent ENGINES=v2-fixed REPS=5 \
                "$py" benchmarks/contrastive_engines.py ;;
    engines) run engines 120 env OUT="$w" ENGINES="${ENGINES:-v2-online,v2-fixed}" "$py" benchmarks/contrastive_engines.py ;;
    bench|contrastive|moco)
      [[ $step != moco ]] && run contrastive 150 "$py" -m sslkernels.bench info_nce clip_loss nt_xent --sizes N=32768:M=32768:D=256 \
        --dtype bf16 --impl ours,eager,compile,peers --out "$w/contrastive"
      [[ $step != contrastive ]] && run moco 90 "$py" -m sslkernels.bench moco_loss --sizes paper --dtype bf16 --impl ours,eager,compile \
        --out "$w/moco"
      [[ $step == bench ]] && run paper 120 "$py" -m sslkernels.bench ema_update_ dino_loss --sizes paper --impl ours,eager,compile,peers \
        --out "$w/paper" ;;
    dino) run dino 90 "$py" -m sslkernels.bench dino_loss --sizes dino --impl ours,eager,compile --out "$w/dino"
          run sinkhorn 90 "$py" -m sslkernels.bench sinkhorn_knopp --sizes B=1024:P=65536 --dtype bf16 --impl ours,eager,compile \
            --out "$w/sinkhorn" ;;
    variants) run variants 170 "$py" benchmarks/dino_variants.py --budget $(( $(left) < 170 ? $(left) - 30 : 140 )) \
                --out "$w/dino-variants" ;;
    profile) run profile-dino 120 "$py" benchmarks/profile_step.py dino_loss --sizes dino --dtype fp32 --graph --out "$w/profile-dino"
             run profile-moco 60 "$py" benchmarks/profile_step.py moco_loss clip_loss --sizes mocov2,N=4096:D=256 --dtype bf16 --graph \
               --out "$w/profile-moco" ;;
    targets) part targets --sizes targets ;;
    # Issue 8's full paper preset in three parts (bf16 contrastive, the rest fp32); merge them afterwards on any machine:
    # python -m sslkernels.bench --merge $TUNE_PARTS/{full-a,full-b,full-c,sweep}/results.json --out benchmarks/results/<gpu>/full
    full-a) part full-a info_nce clip_loss siglip_loss --sizes paper --dtype bf16 ;;
    full-b) part full-b nt_xent supcon_loss moco_loss negative_cosine_similarity dino_loss update_center_ sinkhorn_knopp \
              MemoryQueue.enqueue_ ema_update_ --sizes paper ;;
    full-c) part full-c barlow_twins_loss vicreg_loss similarity knn_topk rankme --sizes paper ;;
    # Issue 8's scaling sweep (time and memory against N, where each implementation runs out of memory or past 2 s a call)
    sweep) part sweep info_nce clip_loss --sweep N --sizes N=1024:M=1024:D=256 --dtype bf16 --sweep-max 524288 ;;
    *) echo "### $step: no such step"; summary+=("| $step | unknown | 0 |") ;;
  esac
done
{ echo; echo "| step ($gpu, ${SECONDS}s of ${call_s}s) | exit | seconds |"; echo "| --- | --- | --- |"; printf '%s\n' "${summary[@]}"; } \
  | tee "$w/summary.md"
} 2>&1 | tee "$out/tune.log"
cp "$w/summary.md" "$out/summary.md" 2>/dev/null
tar czf "$out/tune.tgz" -C "$w" .
