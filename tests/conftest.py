"""Shared test set-up: Triton's interpreter on machines without a GPU, fixed seeds, float64 comparisons."""
import os

# Must happen before anything imports triton: the interpreter is chosen at import time.
try:
    import torch as _torch_probe  # noqa: E402

    _HAS_CUDA = _torch_probe.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
import random  # noqa: E402
import zlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = _HAS_CUDA
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

# Relative tolerances by input dtype (the developers' guide): fp64 1e-6, fp32 1e-4, fp16 1e-3, bf16 1e-2.
RTOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def load_benchmark_script(name):
    """benchmarks/<name>.py as a module (the folder is no package)."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tolerance(dtype):
    return RTOL[dtype]


def assert_close(actual, expected, dtype=None, *, rtol=None, atol=None, name="value"):
    """Compare ``actual`` (any dtype) to a float64 ``expected``.

    The error is measured relative to the largest magnitude of ``expected`` (plus a floor), so entries
    near zero are not held to an impossible per-element relative bound. NaN or Inf in ``actual`` fails
    even when ``expected`` has the same.
    """
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    if dtype is None:
        dtype = actual.dtype if actual.is_floating_point() else torch.float64
    rtol = RTOL[dtype] if rtol is None else rtol
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{name}: non-finite values {a[~torch.isfinite(a)][:5].tolist()}"
    assert torch.isfinite(e).all(), f"{name}: the float64 expectation itself is not finite"
    scale = e.abs().max().item() if e.numel() else 0.0
    bound = rtol * max(scale, 1.0) if atol is None else atol + rtol * scale
    err = (a - e).abs().max().item() if e.numel() else 0.0
    assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e} (rtol {rtol:g}, scale {scale:.3e})"


@pytest.fixture(autouse=True)
def _seed(request):
    # A different, reproducible seed per test: fresh inputs across tests, same inputs on a re-run.
    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    yield


# Global numerics switches a test may flip: TF32 as every torch version spells it (the legacy
# set_float32_matmul_precision rewrites the new API's cuda.matmul and mkldnn.matmul entries too) and deterministic
# algorithms. A test that leaves one changed runs the tests after it under other numerics, by order.
_FP32_PRECISIONS = ("", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul", "mkldnn.conv",
                    "mkldnn.rnn")


def _backend(path):
    obj = torch.backends
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part, None)
    return obj


def _numerics():
    state = {f"torch.backends.{p}.fp32_precision".replace("..", "."): getattr(_backend(p), "fp32_precision", None)
             for p in _FP32_PRECISIONS}
    try:
        state["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    except RuntimeError:  # torch >= 2.9 after a mix of the legacy and the new API: no longer readable
        state["float32_matmul_precision"] = None
    state["deterministic algorithms (on, warn only)"] = (torch.are_deterministic_algorithms_enabled(),
                                                         torch.is_deterministic_algorithms_warn_only_enabled())
    return state


def _restore_numerics(state):
    if state["float32_matmul_precision"] is not None:  # first: it overwrites the new API's matmul entries
        torch.set_float32_matmul_precision(state["float32_matmul_precision"])
    for p in _FP32_PRECISIONS:
        value = state[f"torch.backends.{p}.fp32_precision".replace("..", ".")]
        if value is not None:
            _backend(p).fp32_precision = value
    on, warn_only = state["deterministic algorithms (on, warn only)"]
    torch.use_deterministic_algorithms(on, warn_only=warn_only)


@pytest.fixture
def numerics_restored():
    """For a test that sets TF32 or deterministic algorithms: every such switch is put back afterwards."""
    saved = _numerics()
    yield
    _restore_numerics(saved)


@pytest.fixture(autouse=True)
def _numerics_unchanged():
    saved = _numerics()
    yield
    changed = {k: (v, now) for (k, v), now in zip(saved.items(), _numerics().values()) if v != now}
    if changed:
        _restore_numerics(saved)  # the tests after this one still run as they would alone
        pytest.fail(f"the test left global numerics switches changed (before, after): {changed}; "
                    "use the numerics_restored fixture", pytrace=False)


_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")


@contextlib.contextmanager
def launches(execute: bool = True):
    """Record (kernel name, grid, keyword arguments) of every Triton launch in the block; run them only when
    ``execute`` (without: no memory is touched, so a launch's grid can be checked at any size)."""
    from sslkernels.ops import contrastive

    kernel_type = type(contrastive._fwd_kernel)  # JITFunction on a GPU, InterpretedFunction off it
    original = kernel_type.run
    seen = []

    def run(self, *args, grid, warmup, **kwargs):
        seen.append((self.fn.__name__ if hasattr(self, "fn") else self.__name__, tuple(grid), dict(kwargs)))
        if execute:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    kernel_type.run = run
    try:
        yield seen
    finally:
        kernel_type.run = original


@contextlib.contextmanager
def forbid_host_reads():
    """Make every Tensor -> Python value conversion raise while the block runs."""
    saved = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

    def trap(name):
        def raiser(self, *a, **k):
            raise AssertionError(f"host read: Tensor.{name}() during a step that must stay on the device")
        return raiser

    try:
        for name in _HOST_READS:
            setattr(torch.Tensor, name, trap(name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
