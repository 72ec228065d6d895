#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install sslkernels into it, editable.
# Prints the venv's python path on the last line. The venv lives outside the clone, keyed by the
# requirements file's hash, so repeated runs reuse it; a fresh machine builds it from scratch (~4 min).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
req="$root/requirements/cpu.txt"
# Packages installed without their dependencies (whose declared dependencies would pull a training stack we
# do not use, or another torch): see the file's comments.
nodeps="$root/requirements/no-deps.txt"
key="$(cat "$req" "$nodeps" 2>/dev/null | sha256sum | cut -c1-12)"
venv="${SSLKERNELS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sslkernels/venv-$key}"
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
  echo "[setup] creating $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2 || true
  "$venv/bin/python" -m pip install -q -r "$req" >&2
  if [ -f "$nodeps" ]; then
    "$venv/bin/python" -m pip install -q --no-deps -r "$nodeps" >&2
  fi
  touch "$venv/.complete"
fi
# Editable install; setup.py builds the csrc extension when nvcc is present (and says why when not).
"$venv/bin/python" -m pip install -q --no-build-isolation --no-deps -e "$root" >&2
echo "$venv/bin/python"
