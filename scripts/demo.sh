#!/usr/bin/env bash
# Set everything up and run the main job: a short SimCLR run on scikit-learn's bundled digits
# through sslkernels' ops, printing loss and kNN accuracy per epoch.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="$(bash scripts/setup_env.sh | tail -n 1)"
exec "$py" -m sslkernels.train simclr --data digits "$@"
