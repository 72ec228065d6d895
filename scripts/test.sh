#!/usr/bin/env bash
# Set everything up and run the whole test suite (the README's test command; .ci/run calls it).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="$(bash scripts/setup_env.sh | tail -n 1)"
# CI compiles csrc/ for sm_80 and sm_90 with the machine's nvcc: a compile error fails the run.
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  PYTHON="$py" bash scripts/build_csrc.sh build/csrc
else
  echo "[test] nvcc not found: skipping the csrc compile check"
fi
exec "$py" -m pytest -q tests "$@"
