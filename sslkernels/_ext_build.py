"""Build helper for the optional CUDA extension ``sslkernels._C`` (used by setup.py; also a small CLI).

Standalone on purpose: setup.py loads this file by path, before sslkernels (or even torch) is importable,
so it imports nothing from the package and only the standard library.

The build is CMake over the repository's CMakeLists.txt (Ninja when available). Where no cmake is
installed, one nvcc command builds the same module from the same sources (``direct_build``), so a machine
with only the CUDA toolkit still gets the extension.

    python sslkernels/_ext_build.py [--build-dir DIR] [--out DIR] [--direct]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from typing import List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_ARCHS = "80;90"  # A100 and H100: SASS for both plus PTX (forward compatible)
ENV_BUILD = "SSLKERNELS_BUILD_CUDA"
ENV_ARCHS = "SSLKERNELS_CUDA_ARCHS"


def find_nvcc() -> Optional[str]:
    """nvcc from $CUDA_HOME / $CUDA_PATH, /usr/local/cuda, then PATH."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            path = os.path.join(home, "bin", "nvcc")
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
    return shutil.which("nvcc")


def decide() -> Tuple[bool, bool, str]:
    """(build it, a failure is fatal, why) from $SSLKERNELS_BUILD_CUDA and the presence of nvcc."""
    flag = os.environ.get(ENV_BUILD, "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False, False, f"{ENV_BUILD}={os.environ[ENV_BUILD]}"
    required = flag in ("1", "true", "yes", "on")
    nvcc = find_nvcc()
    if nvcc is None:
        why = "no nvcc found (CUDA_HOME, CUDA_PATH, /usr/local/cuda, PATH)"
        return required, required, why  # required without nvcc: let the build fail with that message
    return True, required, f"nvcc at {nvcc}" + (f" ({ENV_BUILD}=1)" if required else "")


def _tool(name: str, python: str) -> Optional[str]:
    """A build tool on PATH or next to the interpreter (a venv's pip-installed cmake / ninja)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = os.path.join(os.path.dirname(python), name)
    return candidate if os.path.isfile(candidate) and os.access(candidate, os.X_OK) else None


def _run(cmd: List[str], cwd: Optional[str] = None) -> None:
    print("[sslkernels] " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def cmake_build(build_dir: str, out_dir: str, *, python: str = sys.executable, nvcc: Optional[str] = None,
                archs: Optional[str] = None, jobs: Optional[int] = None) -> None:
    """Configure + build CMakeLists.txt; the module is written into ``out_dir``. Raises on any failure."""
    cmake = _tool("cmake", python)
    if cmake is None:
        raise FileNotFoundError("cmake not found")
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    nvcc = os.path.realpath(nvcc)
    cache = os.path.join(build_dir, "CMakeCache.txt")
    if os.path.exists(cache):
        with open(cache) as f:
            same = any(line.startswith("CMAKE_CUDA_COMPILER:") and line.rstrip("\n").endswith("=" + nvcc) for line in f)
        if not same:
            # CMake wipes a cache whose CUDA compiler changed and then drops this run's -D options with it.
            os.remove(cache)
            shutil.rmtree(os.path.join(build_dir, "CMakeFiles"), ignore_errors=True)
    archs = archs or os.environ.get(ENV_ARCHS) or DEFAULT_ARCHS
    cmd = [cmake, "-S", ROOT, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_CUDA_COMPILER={nvcc}",
           f"-DCMAKE_CUDA_ARCHITECTURES={archs}", f"-DPython_EXECUTABLE={python}",
           f"-DSSLKERNELS_OUTPUT_DIR={os.path.abspath(out_dir)}"]
    ninja = _tool("ninja", python)
    if ninja and not os.path.exists(os.path.join(build_dir, "CMakeCache.txt")):
        cmd += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]  # a configured dir keeps its generator
    _run(cmd)
    _run([cmake, "--build", build_dir, "--parallel", str(jobs or os.cpu_count() or 2)])


def _pybind11_include(python: str) -> str:
    out = subprocess.run([python, "-c", "import pybind11; print(pybind11.get_include())"],
                         capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.strip():
        return out.stdout.strip()
    out = subprocess.run([python, "-c", "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))"],
                         capture_output=True, text=True)
    inc = out.stdout.strip()
    if out.returncode == 0 and os.path.isfile(os.path.join(inc, "pybind11", "pybind11.h")):
        return inc
    raise FileNotFoundError("pybind11 headers not found: pip install pybind11")


def direct_build(out_dir: str, *, python: str = sys.executable, nvcc: Optional[str] = None,
                 archs: Optional[str] = None) -> str:
    """Build the module with a single nvcc command (no cmake). Only for the running interpreter's ABI."""
    if os.path.realpath(python) != os.path.realpath(sys.executable):
        raise ValueError("direct_build builds for the running interpreter; run this file with that python")
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    archs = [a.strip() for a in (archs or os.environ.get(ENV_ARCHS) or DEFAULT_ARCHS).split(";") if a.strip()]
    gencode = []
    for a in archs:
        num = a.split("-")[0]
        gencode += ["-gencode", f"arch=compute_{num},code=[compute_{num},sm_{num}]"]
    target = os.path.join(out_dir, "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    sources = [os.path.join(CSRC, f) for f in sorted(os.listdir(CSRC)) if f.endswith((".cu", ".cpp"))]
    cmd = [nvcc, "-O3", "-std=c++17", "-shared", "-cudart=static", "--expt-relaxed-constexpr",
           "-Xcompiler=-fPIC,-fvisibility=hidden", *gencode, f"-DSSLKERNELS_CUDA_ARCHS=\"{','.join(archs)}\"",
           "-I", CSRC, "-I", _pybind11_include(python), "-I", sysconfig.get_paths()["include"],
           *sources, "-o", target]
    _run(cmd)
    return target


def build(build_dir: str, out_dir: str, *, python: str = sys.executable) -> None:
    """CMake when available, else the direct nvcc build."""
    if _tool("cmake", python) is None:
        print("[sslkernels] cmake not found: building csrc with nvcc directly", flush=True)
        direct_build(out_dir, python=python)
    else:
        cmake_build(build_dir, out_dir, python=python)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", default=os.path.join(ROOT, "build", "csrc"))
    parser.add_argument("--out", default=os.path.join(ROOT, "sslkernels"), help="where _C*.so is written")
    parser.add_argument("--direct", action="store_true", help="one nvcc command instead of CMake")
    args = parser.parse_args(argv)
    try:
        if args.direct:
            direct_build(args.out)
        else:
            build(args.build_dir, args.out)
    except (subprocess.CalledProcessError, FileNotFoundError, ValueError) as err:
        print(f"[sslkernels] csrc build failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
