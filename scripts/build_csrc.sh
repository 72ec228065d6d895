#!/usr/bin/env bash
# Configure and build the CUDA extension sslkernels._C from csrc/ with CMake (Ninja when available).
# Exits non-zero on any configure or compile error (CI relies on this).
#
#   bash scripts/build_csrc.sh [BUILD_DIR]          default build/csrc
#   PYTHON=...            the interpreter to build for (default: python3)
#   CUDA_ARCHS="80;90"    CMAKE_CUDA_ARCHITECTURES (default "80;90": A100 and H100 SASS + PTX)
#   CUDA_HOME=...         toolkit location when nvcc is not on PATH (default /usr/local/cuda)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${1:-$root/build/csrc}"
py="${PYTHON:-python3}"
archs="${CUDA_ARCHS:-80;90}"

# Same search order as setup.py (sslkernels/_ext_build.py): CUDA_HOME, CUDA_PATH, /usr/local/cuda, PATH.
nvcc=""
for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
  [ -z "$nvcc" ] && [ -n "$home" ] && [ -x "$home/bin/nvcc" ] && nvcc="$home/bin/nvcc"
done
[ -z "$nvcc" ] && nvcc="$(command -v nvcc || true)"
if [ -z "$nvcc" ]; then
  echo "[build_csrc] nvcc not found (CUDA_HOME, CUDA_PATH, /usr/local/cuda, PATH): cannot build the CUDA extension" >&2
  exit 1
fi
nvcc="$(realpath "$nvcc")"
# CMake wipes a cache whose CUDA compiler path changed and then drops this run's -D options with it;
# start such a build dir afresh instead.
if [ -f "$build/CMakeCache.txt" ] && ! grep -qx "CMAKE_CUDA_COMPILER:[A-Z]*=$nvcc" "$build/CMakeCache.txt"; then
  rm -rf "$build/CMakeCache.txt" "$build/CMakeFiles"
fi
if ! command -v cmake >/dev/null 2>&1; then
  # Same sources, same flags, one nvcc command (sslkernels/_ext_build.py); fails the same way on an error.
  echo "[build_csrc] cmake not found: building with nvcc directly" >&2
  CUDA_HOME="$(dirname "$(dirname "$nvcc")")" SSLKERNELS_CUDA_ARCHS="$archs" exec "$py" "$root/sslkernels/_ext_build.py" --direct
fi

gen=()
# Reuse an existing build dir with its generator; otherwise prefer Ninja (the venv's, or the system's).
if [ ! -f "$build/CMakeCache.txt" ]; then
  ninja="$(command -v ninja || true)"
  [ -z "$ninja" ] && [ -x "$(dirname "$("$py" -c 'import sys; print(sys.executable)')")/ninja" ] && \
    ninja="$(dirname "$("$py" -c 'import sys; print(sys.executable)')")/ninja"
  [ -n "$ninja" ] && gen=(-G Ninja -DCMAKE_MAKE_PROGRAM="$ninja")
fi

echo "[build_csrc] nvcc: $nvcc ($("$nvcc" --version | tail -n 1)); archs: $archs; build dir: $build"
t0=$SECONDS
cmake -S "$root" -B "$build" "${gen[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_COMPILER="$nvcc" \
  -DCMAKE_CUDA_ARCHITECTURES="$archs" \
  -DPython_EXECUTABLE="$("$py" -c 'import sys; print(sys.executable)')" \
  -DSSLKERNELS_OUTPUT_DIR="$root/sslkernels"
cmake --build "$build" --parallel "$(nproc 2>/dev/null || echo 2)"
so="$(ls "$root"/sslkernels/_C*.so 2>/dev/null | head -n 1)"
echo "[build_csrc] built ${so:-?} in $((SECONDS - t0))s"
