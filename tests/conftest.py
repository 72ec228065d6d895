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

import collections.abc  # noqa: E402
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


# ----------------------------------------------------------------------------------- host synchronizations
# forbid_host_reads sees Tensor -> Python conversions only. On a GPU a step also waits on the host when it builds a
# tensor from Python data on the device (torch.tensor(x, device="cuda") is a copy from pageable memory, which
# synchronizes), moves a host tensor to the device or a device tensor to the host, calls a synchronize, or runs an op
# whose output shape depends on the values (nonzero, masked_select, unique, boolean-mask indexing,
# repeat_interleave without output_size: the size is read back). A CPU run cannot see the copies, so host_syncs
# follows the tensors the step makes on the host (factories with no device, from Python data or numpy, and what
# is computed from those alone) and reports when one of them crosses to a tensor of the step's device: .to(device),
# .cuda(), copy_ into it, or as an index of it. Such host tensors may be read freely (no GPU involved).

_FACTORIES = ("tensor", "as_tensor", "asarray", "from_numpy", "zeros", "ones", "empty", "full", "arange", "range",
              "linspace", "logspace", "eye", "rand", "randn", "randint", "randperm", "scalar_tensor", "frombuffer")
_FROM_DATA = ("tensor", "as_tensor", "asarray", "from_numpy", "frombuffer")
_DATA_DEPENDENT = ("nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive",
                   "_unique", "equal", "_local_scalar_dense", "is_nonzero", "bincount", "histc", "allclose")


class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def host_syncs(*, raise_=True, moves=False):
    """Report every host synchronization the block would make on a GPU (see above). ``raise_``: raise HostSync at
    the first; otherwise yield a list of (what, stack) to review. ``moves``: also report every .to(device) /
    .cuda() with an explicit device of a tensor not made in the block (a buffer left on the host and moved each
    step would copy each step; on a CPU run it cannot be told from a no-op move), for review."""
    import traceback
    import weakref
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    found = []
    host = {}  # id -> weak reference of the tensors made on the host in the block (not a WeakSet: == on tensors)
    state = {"off": 0}
    factories = {getattr(torch, n): n for n in _FACTORIES if hasattr(torch, n)}

    def hit(what):
        if state["off"]:
            return
        stack = "".join(traceback.format_list([f for f in traceback.extract_stack()[:-2]
                                               if "/tests/conftest.py" not in f.filename
                                               and "/torch/" not in f.filename][-6:]))
        if raise_:
            raise HostSync(f"host sync: {what}\n{stack}")
        found.append((what, stack))

    def is_host(t):
        ref = host.get(id(t)) if isinstance(t, torch.Tensor) else None
        return ref is not None and ref() is t

    def add_host(t):
        host[id(t)] = weakref.ref(t)

    def tensors(xs):
        for x in xs:
            if isinstance(x, torch.Tensor):
                yield x
            elif isinstance(x, (list, tuple)):
                yield from tensors(x)
            elif isinstance(x, dict):
                yield from tensors(list(x.values()))

    def has_device(args, kwargs):
        if kwargs.get("device") is not None:
            return True
        return any(isinstance(a, (torch.device, str, int)) and not isinstance(a, bool) and
                   _looks_like_device(a) for a in args)

    def _looks_like_device(a):
        if isinstance(a, torch.device):
            return True
        if isinstance(a, str):
            try:
                torch.device(a)
                return True
            except RuntimeError:
                return False
        return False

    class Functions(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if state["off"]:
                return func(*args, **kwargs)
            name = factories.get(func) if isinstance(func, collections.abc.Hashable) else None
            if name is not None:
                data = args[0] if args else kwargs.get("data", kwargs.get("obj"))
                if name in ("as_tensor", "asarray") and isinstance(data, torch.Tensor):
                    if kwargs.get("device") is not None and is_host(data):
                        hit(f"torch.{name}(host tensor, device=...)")
                    out = func(*args, **kwargs)
                    if is_host(data) and kwargs.get("device") is None:
                        add_host(out)
                    return out
                if kwargs.get("device") is not None and name in _FROM_DATA:
                    hit(f"torch.{name}(<Python data>, device={kwargs['device']}): a copy from pageable host memory")
                out = func(*args, **kwargs)
                if kwargs.get("device") is None and isinstance(out, torch.Tensor):
                    add_host(out)
                return out
            name = getattr(func, "__name__", "")
            if name in ("to", "cuda", "copy_", "new_tensor", "cpu", "numpy", "tolist", "pin_memory"):
                self_ = args[0] if args else None
                if name == "to" and has_device(args[1:], kwargs):
                    if is_host(self_):
                        hit("Tensor.to(device) of a tensor made on the host in the step")
                    elif moves:
                        hit("Tensor.to(device) (review: a no-op only if the tensor is already there)")
                elif name == "cuda":
                    hit("Tensor.cuda()")
                elif name == "copy_" and len(args) > 1 and is_host(args[1]) and not is_host(self_):
                    hit("Tensor.copy_(tensor made on the host in the step)")
                elif name == "new_tensor":
                    hit("Tensor.new_tensor(<Python data>): a copy from pageable host memory")
                elif name in ("cpu", "numpy", "tolist") and not is_host(self_):
                    hit(f"Tensor.{name}()")
            return func(*args, **kwargs)

    class Aten(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if state["off"]:
                return func(*args, **kwargs)
            ins = list(tensors(list(args) + list(kwargs.values())))
            on_host = bool(ins) and all(is_host(t) for t in ins)
            name = func._schema.name.split("::")[-1]
            if not on_host:
                if name in _DATA_DEPENDENT:
                    hit(f"aten.{name}: output shape or value read back")
                elif name == "repeat_interleave" and kwargs.get("output_size") is None:
                    hit("aten.repeat_interleave without output_size")
                elif name in ("index", "index_put", "index_put_", "_index_put_impl_"):
                    for idx in tensors(args[1]):
                        if idx.dtype in (torch.bool, torch.uint8):
                            hit(f"aten.{name} with a boolean mask (a nonzero inside)")
                        elif is_host(idx) and idx.dim() > 0:
                            hit(f"aten.{name} with index tensors made on the host (copied to the device)")
                elif name in ("_to_copy", "copy_", "copy") and ins:
                    devices = {t.device.type for t in ins}
                    dst = kwargs.get("device")
                    if len(devices) > 1 or (dst is not None and torch.device(dst).type not in devices):
                        hit(f"aten.{name} between devices")
            out = func(*args, **kwargs)
            if name == "lift_fresh" and out.device.type == "cpu":  # from Python data or numpy (torch.from_numpy)
                on_host = True
            if on_host:
                for t in tensors([out]):
                    add_host(t)
            return out

    # The Triton interpreter runs kernels on host copies of the arguments: not part of the step on a GPU.
    from sslkernels.ops import contrastive
    kernel_type = type(contrastive._fwd_kernel)
    original_run = kernel_type.run

    def run(*a, **k):
        state["off"] += 1
        try:
            return original_run(*a, **k)
        finally:
            state["off"] -= 1

    def trap_read(name, original):
        def read(self, *a, **k):
            if not state["off"] and not is_host(self):
                hit(f"host read: Tensor.{name}()")
            return original(self, *a, **k)
        return read

    def trap_sync(what, original):
        def sync(*a, **k):
            hit(what)
            return original(*a, **k)
        return sync

    saved_reads = {name: getattr(torch.Tensor, name) for name in _HOST_READS}
    saved_syncs = [(torch.cuda, "synchronize"), (torch.cuda.Stream, "synchronize"), (torch.cuda.Event, "synchronize"),
                   (torch.cuda.Event, "elapsed_time")]
    saved_syncs = [(owner, name, getattr(owner, name)) for owner, name in saved_syncs]
    try:
        for name, fn in saved_reads.items():
            setattr(torch.Tensor, name, trap_read(name, fn))
        for owner, name, fn in saved_syncs:
            setattr(owner, name, trap_sync(f"{getattr(owner, '__name__', owner)}.{name}()", fn))
        kernel_type.run = run
        with Functions(), Aten():
            yield found
    finally:
        kernel_type.run = original_run
        for name, fn in saved_reads.items():
            setattr(torch.Tensor, name, fn)
        for owner, name, fn in saved_syncs:
            setattr(owner, name, fn)
