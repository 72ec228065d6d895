"""Install sslkernels; builds the optional CUDA extension sslkernels._C from csrc/ when it can.

Pure Python + Triton always installs. The extension is built with CMake (CMakeLists.txt, the same build
as scripts/build_csrc.sh) when nvcc is found (CUDA_HOME, CUDA_PATH, /usr/local/cuda, PATH):

  SSLKERNELS_BUILD_CUDA unset  build if nvcc is found; a failed build warns and the install goes on
  SSLKERNELS_BUILD_CUDA=1      build; a failed build (or no nvcc) fails the install
  SSLKERNELS_BUILD_CUDA=0      never build
  SSLKERNELS_CUDA_ARCHS        CMAKE_CUDA_ARCHITECTURES (default "80;90")

pip hides this file's messages unless run with -v.
"""
import importlib.util
import os
import subprocess

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

HERE = os.path.dirname(os.path.abspath(__file__))

# Loaded by path: the package itself (and torch) need not be importable while building.
_spec = importlib.util.spec_from_file_location("_sslkernels_ext_build", os.path.join(HERE, "sslkernels", "_ext_build.py"))
ext_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ext_build)


class CMakeExtension(Extension):
    def __init__(self, name: str, optional: bool):
        super().__init__(name, sources=[], optional=optional)


class BuildCSrc(build_ext):
    """build_ext that runs the CMake build; its output lands where setuptools expects the module
    (build/lib... for a wheel, copied into sslkernels/ for an editable install)."""

    def build_extension(self, ext):
        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        # The source tree's build/csrc (scripts/build_csrc.sh's default too) when writable: CMake then
        # reuses its objects and a re-install (scripts/setup_env.sh runs one every time) only relinks.
        build_dir = os.path.join(HERE, "build", "csrc")
        if not os.access(HERE, os.W_OK):
            build_dir = os.path.join(os.path.abspath(self.build_temp), "csrc")
        try:
            ext_build.build(build_dir, out_dir)
        except (subprocess.CalledProcessError, FileNotFoundError, ValueError) as err:
            # CompileError on an optional extension is turned into a warning by setuptools.
            raise CompileError(f"building sslkernels._C from csrc/ failed: {err}") from err
        if not os.path.exists(self.get_ext_fullpath(ext.name)):
            raise CompileError(f"the csrc build did not produce {self.get_ext_fullpath(ext.name)}")


build_it, required, why = ext_build.decide()
if build_it:
    print(f"[sslkernels] building the CUDA extension sslkernels._C: {why}")
    ext_modules = [CMakeExtension("sslkernels._C", optional=not required)]
else:
    print(f"[sslkernels] not building the CUDA extension sslkernels._C: {why}; backend='cuda' will be unavailable")
    ext_modules = []

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildCSrc})
