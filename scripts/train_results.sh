#!/usr/bin/env bash
# Reproduce benchmarks/results/<machine>/train: every reference trainer's default run, the fused-vs-reference
# comparison of each (float32 with alternating repeats for time, float64 for agreement) and a resume check.
#   bash scripts/train_results.sh [OUT]        (default OUT: benchmarks/results/cpu-xeon-2vcpu/train)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/cpu-xeon-2vcpu/train}
METHODS=${METHODS:-"simclr moco mocov3 byol simsiam dino clip supcon"}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
for m in $METHODS; do
  /usr/bin/time -f "$m wall %e s" python -m sslkernels.train "$m" --progress off --out "$OUT/$m" > "$OUT/$m.log" 2>&1
  tail -1 "$OUT/$m.log"
  rm -f "$OUT/$m/checkpoint.pt"  # results keep report.json and curves.png, not weights
done
for m in $METHODS; do
  # 50 steps: digits' 1347 training images make 5 steps per epoch at batch 256, 10 at DINO's 128.
  epochs=10; [ "$m" = dino ] && epochs=5
  for dtype in float32 float64; do
    python -m sslkernels.train "$m" --impl both --dtype "$dtype" --compare-repeats "$([ $dtype = float32 ] && echo 3 || echo 1)" \
      --epochs $epochs --no-checkpoint --no-plots --progress off --out "$OUT/compare/$m-$dtype" 2>&1 | tail -1
    rm -rf "$OUT/compare/$m-$dtype"/*-repeat*
  done
done
python -m sslkernels.train moco --progress off --out /tmp/sslk-moco-part --stop-after 15 > /dev/null
python -m sslkernels.train moco --progress off --resume /tmp/sslk-moco-part/checkpoint.pt > /dev/null
python - "$OUT/moco/report.json" /tmp/sslk-moco-part/report.json <<'PY'
import json, sys
full, resumed = (json.load(open(p)) for p in sys.argv[1:])
same = full["step_losses"] == resumed["step_losses"]
print(f"resume: {len(resumed['step_losses'])} step losses identical to the uninterrupted run: {same}")
PY
