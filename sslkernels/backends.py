"""Backend selection: the ``backend=`` argument, ``SSLKERNELS_BACKEND`` and ``set_backend``.

Names users pass:
  "auto"   Triton on CUDA tensors, the memory-efficient PyTorch path ("cpu") elsewhere.
  "triton" fused Triton kernels (CPU tensors only under TRITON_INTERPRET=1).
  "cuda"   the compiled csrc extension (sslkernels._C), where built.
  "torch"  the plain eager reference (materializes everything; the oracle).

Each op registers the implementations it has with :func:`register`; :func:`dispatch` picks one.
An op that has no implementation for the chosen backend falls back along ``_FALLBACK`` only when the
user asked for "auto"; an explicit choice that cannot be honoured is an error, never a silent switch.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from typing import Callable, Dict, Optional

import torch

PUBLIC_BACKENDS = ("auto", "triton", "cuda", "torch")
# "cpu" is the memory-efficient PyTorch path; users reach it through "auto" on CPU tensors.
_IMPL_KINDS = ("triton", "cuda", "cpu", "torch")
_ENV_VAR = "SSLKERNELS_BACKEND"

_registry: Dict[str, Dict[str, Callable]] = {}
_default: Optional[str] = None


def _check_name(name, argname: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{argname} must be a str, one of {PUBLIC_BACKENDS}; got {type(name).__name__}")
    key = name.strip().lower()
    if key not in PUBLIC_BACKENDS:
        raise ValueError(f"{argname} must be one of {PUBLIC_BACKENDS}; got {name!r}")
    return key


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide default backend (``None`` returns to ``SSLKERNELS_BACKEND`` / "auto")."""
    global _default
    _default = None if name is None else _check_name(name, "backend")


def get_backend() -> str:
    """The default backend in force: ``set_backend`` first, then ``SSLKERNELS_BACKEND``, then "auto"."""
    if _default is not None:
        return _default
    env = os.environ.get(_ENV_VAR)
    if env:
        return _check_name(env, _ENV_VAR)
    return "auto"


def register(op: str, kind: str):
    """Decorator: register ``fn`` as the ``kind`` implementation of ``op``."""
    if kind not in _IMPL_KINDS:
        raise ValueError(f"unknown implementation kind {kind!r}")

    def deco(fn):
        _registry.setdefault(op, {})[kind] = fn
        return fn

    return deco


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


# csrc/bindings.cpp's kAbiVersion: the arguments and meanings of the _C functions this package calls.
CSRC_ABI_VERSION = 2


def cuda_extension():
    """The compiled csrc module, or None when it was not built (see setup.py) or cannot be used: one that
    fails to load, or one built from other sources (a stale build would take this package's arguments with
    other meanings), is ignored with a warning, so backend="cuda" is unavailable rather than wrong."""
    try:
        # import_module, not `from . import _C`: an absent _C is then ModuleNotFoundError naming it, while the
        # from-import raises a plain ImportError that looks like a broken build (a warning on every CPU machine).
        _C = importlib.import_module(f"{__package__}._C")
    except ImportError as err:
        if isinstance(err, ModuleNotFoundError) and err.name == f"{__package__}._C":
            return None  # not built
        warnings.warn(f"sslkernels._C is present but does not load ({err}); the CUDA extension is unavailable: "
                      "rebuild it (bash scripts/build_csrc.sh or pip install -e .)", RuntimeWarning, stacklevel=2)
        return None
    version = getattr(_C, "abi_version", None)
    if version != CSRC_ABI_VERSION:
        warnings.warn(f"sslkernels._C at {getattr(_C, '__file__', '?')} was built from other sources (ABI version "
                      f"{version}, this package needs {CSRC_ABI_VERSION}); ignoring it, the CUDA extension is "
                      "unavailable: rebuild it (bash scripts/build_csrc.sh or pip install -e .)", RuntimeWarning,
                      stacklevel=2)
        return None
    return _C


def available(op: str) -> Dict[str, Callable]:
    _load_ops()
    return dict(_registry.get(op, {}))


def _load_ops() -> None:
    # Importing the ops package runs every @register; done lazily so `import sslkernels` stays cheap
    # and a broken optional dependency (no triton) only matters to the ops that need it.
    from . import ops  # noqa: F401


def _usable(kind: str, device: torch.device) -> bool:
    if kind == "triton":
        return triton_available() and (device.type == "cuda" or triton_interpreted())
    if kind == "cuda":
        return device.type == "cuda" and cuda_extension() is not None
    if kind == "cpu":
        return device.type == "cpu"
    return True


def resolve(op: str, backend: Optional[str], device: torch.device) -> str:
    """The implementation kind that will run ``op`` for tensors on ``device``."""
    name = get_backend() if backend is None else _check_name(backend, "backend")
    impls = available(op)
    if name == "auto":
        order = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")
        for kind in order:
            if kind in impls and _usable(kind, device):
                return kind
        raise RuntimeError(f"no implementation of {op} runs on {device}")  # unreachable: torch is always there
    if name == "torch":
        return "torch"
    if name not in impls:
        have = sorted(k for k in impls if k != "cpu")
        raise ValueError(f"backend={name!r} is not available for {op}; it has {have} (or use backend='auto')")
    if not _usable(name, device):
        if name == "triton":
            why = ("Triton is not installed" if not triton_available() else
                   f"tensors are on {device}: Triton needs CUDA tensors, or TRITON_INTERPRET=1 set before import")
        else:
            why = (f"tensors are on {device}: the csrc extension runs on CUDA tensors" if device.type != "cuda"
                   else "sslkernels._C was not built (install with nvcc present or SSLKERNELS_BUILD_CUDA=1)")
        raise ValueError(f"backend={name!r} cannot run {op}: {why}")
    return name


def dispatch(op: str, backend: Optional[str], device: torch.device) -> Callable:
    """The implementation of ``op`` for tensors on ``device``; on a CUDA device that is not the current one it
    runs with that device made current (Triton and csrc launch on the current device and its stream: tensors on
    cuda:1 under a current cuda:0 would be read across devices, or fault)."""
    fn = available(op)[resolve(op, backend, device)]
    if not torch.compiler.is_compiling() and _not_current(device):
        return functools.partial(_on_device, fn, device)
    return fn


def _not_current(device: torch.device) -> bool:
    return device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device()


def device_guard(device: torch.device):
    """A context making ``device`` the current CUDA device when it is not (Triton and csrc launch on the
    current device and its stream); nothing otherwise."""
    return torch.cuda.device(device) if _not_current(device) else contextlib.nullcontext()


def _on_device(fn: Callable, device: torch.device, *args, **kwargs):
    with torch.cuda.device(device):
        return fn(*args, **kwargs)
