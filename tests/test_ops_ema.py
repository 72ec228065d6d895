"""ema_update_ implementations (sslkernels/ops/ema.py) against float64 math written here.

"triton" runs under the interpreter on CPU tensors when there is no GPU (conftest sets TRITON_INTERPRET),
on CUDA tensors otherwise; "cuda" (the csrc extension) needs a GPU and a built sslkernels._C; "cpu" always
runs. The tables are tested with a small chunk size so a few thousand elements span several chunks,
full and partial, and the Triton loop runs both its unmasked blocks and its masked tail.
"""

import pytest
import torch

import sslkernels.ops.ema as ema  # registers the impls (sslkernels.ops imports it as well)
from conftest import HAS_CUDA, assert_close, forbid_host_reads
from sslkernels.backends import CSRC_ABI_VERSION, available, cuda_extension, triton_interpreted

f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_triton = pytest.mark.skipif(not HAS_CUDA and not triton_interpreted(),
                                  reason="Triton needs a GPU or TRITON_INTERPRET=1")
needs_csrc = pytest.mark.skipif(not HAS_CUDA or cuda_extension() is None,
                                reason="needs a GPU and the built sslkernels._C extension")

# (target dtype, source dtype). bf16 kernels are checked on a GPU only (as the other Triton tests do).
PAIRS = [(f32, f32), (f16, f16), (f32, f16), (f16, f32), (f64, f32), (f32, f64)]
GPU_PAIRS = PAIRS + [(bf16, bf16), (f32, bf16), (bf16, f32), (f64, f64), (bf16, f16)]
CPU_PAIRS = PAIRS + [(bf16, bf16), (f32, bf16), (bf16, f32), (f64, f64)]
TRITON_PAIRS = GPU_PAIRS if HAS_CUDA else PAIRS

# With CHUNK (below): 2048 and 4096 fill whole chunks, 2051 and 5000 end in partial ones.
SHAPES = [(1,), (7,), (3, 5), (1000,), (2051,), (4096,), (5000,), (2, 3, 17)]
CHUNK = 2048
MOMENTA = ["float", "fp32 tensor", "fp64 tensor"]


def impl(kind):
    return available("ema_update_")[kind]


def make_momentum(kind, value, device):
    if kind == "float":
        return value
    return torch.tensor(value, dtype={"fp32 tensor": f32, "fp64 tensor": f64, "bf16 tensor": bf16,
                                      "fp16 tensor": f16}[kind], device=device)


def make_pairs(shapes, t_dtype, s_dtype, device):
    targets = [(torch.randn(sh, dtype=f64) * 3).to(device, t_dtype) for sh in shapes]
    sources = [(torch.randn(sh, dtype=f64) * 3).to(device, s_dtype) for sh in shapes]
    return targets, sources


def expected64(targets, sources, momentum):
    m = float(momentum.double()) if isinstance(momentum, torch.Tensor) else float(momentum)
    return [t.double() * m + s.double() * (1 - m) for t, s in zip(targets, sources)]


def check(targets, expected, name=""):
    for i, (t, e) in enumerate(zip(targets, expected)):
        assert_close(t, e, t.dtype, name=f"{name} target[{i}] {tuple(t.shape)} {t.dtype}")


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(ema, "CHUNK_SIZE", CHUNK)


def run_and_check(kind, device, t_dtype, s_dtype, momentum_kind, shapes=SHAPES, value=0.8):
    targets, sources = make_pairs(shapes, t_dtype, s_dtype, device)
    momentum = make_momentum(momentum_kind, value, device)
    want = expected64(targets, sources, momentum)
    sources_before = [s.clone() for s in sources]
    impl(kind)(targets, sources, momentum)
    check(targets, want, kind)
    for s, b in zip(sources, sources_before):
        assert torch.equal(s, b), "the sources must not change"


# ------------------------------------------------------------------------------------------ values


@needs_triton
@pytest.mark.parametrize("momentum_kind", MOMENTA)
@pytest.mark.parametrize("t_dtype,s_dtype", TRITON_PAIRS)
def test_triton_matches_float64(small_chunks, t_dtype, s_dtype, momentum_kind):
    run_and_check("triton", TRITON_DEVICE, t_dtype, s_dtype, momentum_kind)


@pytest.mark.parametrize("momentum_kind", MOMENTA)
@pytest.mark.parametrize("t_dtype,s_dtype", CPU_PAIRS)
def test_cpu_matches_float64(t_dtype, s_dtype, momentum_kind):
    run_and_check("cpu", "cpu", t_dtype, s_dtype, momentum_kind)


@pytest.mark.parametrize("momentum_kind", MOMENTA)
@pytest.mark.parametrize("kind", [pytest.param("triton", marks=needs_triton), "cpu"])
def test_float64_targets_get_the_momentum_to_float64_precision(small_chunks, kind, momentum_kind):
    # A float momentum reaches the Triton kernel as an fp32 pair hi + lo: with hi alone m = 0.996 is off by
    # ~1e-8, which the float64 tolerance above (1e-6) does not see. Here the bound is a few fp64 ulp.
    device = TRITON_DEVICE if kind == "triton" else "cpu"
    for s_dtype in (f32, f64):
        targets, sources = make_pairs([(7,), (2051,)], f64, s_dtype, device)
        momentum = make_momentum(momentum_kind, 0.996, device)
        want = expected64(targets, sources, momentum)
        impl(kind)(targets, sources, momentum)
        for t, e in zip(targets, want):
            assert_close(t, e, f64, rtol=1e-14, name=f"{kind} {s_dtype} {tuple(t.shape)}")


def test_cpu_steps_through_large_low_precision_tensors(monkeypatch):
    monkeypatch.setattr(ema, "_CPU_STEP", 1000)  # 2051 elements: two full steps and a short one
    run_and_check("cpu", "cpu", f16, f32, "fp32 tensor", shapes=[(2051,), (7,)])


@needs_triton
def test_triton_default_chunk_prime_numel():
    # The shipped chunk size over a prime numel: several chunks, the last one partial.
    run_and_check("triton", TRITON_DEVICE, f32, f16, "float", shapes=[(100003,), (1,)], value=0.996)


@pytest.mark.parametrize("kind", ["triton", "cpu", "cuda"])
def test_one_call_with_many_tensors_of_mixed_dtypes(small_chunks, kind):
    device = {"triton": TRITON_DEVICE, "cpu": "cpu", "cuda": "cuda"}[kind]
    if kind == "triton" and not (HAS_CUDA or triton_interpreted()):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    if kind == "cuda" and (not HAS_CUDA or cuda_extension() is None):
        pytest.skip("needs a GPU and the built sslkernels._C extension")
    pairs = GPU_PAIRS if device == "cuda" else (TRITON_PAIRS if kind == "triton" else CPU_PAIRS)
    gen = torch.Generator().manual_seed(7)
    targets, sources = [], []
    for i in range(41):
        t_dtype, s_dtype = pairs[i % len(pairs)]
        numel = int(torch.randint(1, 3000, (1,), generator=gen))
        targets.append((torch.randn(numel, dtype=f64) * 2).to(device, t_dtype))
        sources.append((torch.randn(numel, dtype=f64) * 2).to(device, s_dtype))
    for momentum in (0.9, torch.tensor(0.99, device=device)):
        want = expected64(targets, sources, momentum)
        impl(kind)(targets, sources, momentum)
        check(targets, want, kind)


@pytest.mark.parametrize("kind", ["triton", "cpu"])
@pytest.mark.parametrize("value", [0.0, 1.0])
def test_momentum_zero_copies_and_one_keeps(small_chunks, kind, value):
    if kind == "triton" and not (HAS_CUDA or triton_interpreted()):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    device = TRITON_DEVICE if kind == "triton" else "cpu"
    for momentum in (value, torch.tensor(value, device=device)):
        targets, sources = make_pairs([(5000,), (3,)], f32, f16, device)
        before = [t.clone() for t in targets]
        impl(kind)(targets, sources, momentum)
        for t, s, b in zip(targets, sources, before):
            assert torch.equal(t, s.float() if value == 0.0 else b)


# ----------------------------------------------------------------------------------------- layouts


def layout_cases(device, t_dtype, s_dtype):
    """(target, source, base tensors that must keep their other elements) for several memory layouts."""
    def r(*shape, dtype):
        return (torch.randn(*shape, dtype=f64) * 2).to(device, dtype)

    cases = []
    # Transposed (dense, same strides): the flat kernel path.
    cases.append((r(9, 13, dtype=t_dtype).t(), r(9, 13, dtype=s_dtype).t(), None))
    # channels_last 4-d pair.
    cases.append((r(2, 3, 5, 4, dtype=t_dtype).to(memory_format=torch.channels_last),
                  r(2, 3, 5, 4, dtype=s_dtype).to(memory_format=torch.channels_last), None))
    # Views one element into their buffers: contiguous but not 16-byte aligned (scalar accesses).
    tb, sb = r(2052, dtype=t_dtype), r(2052, dtype=s_dtype)
    cases.append((tb[1:2050], sb[3:2052], tb))
    # Strided slice (not dense): the eager path; the elements between must not change.
    tb2 = r(6, 10, dtype=t_dtype)
    cases.append((tb2[:, ::3], r(6, 4, dtype=s_dtype), tb2))
    # Both strided alike (equal strides, but gaps between elements): still the eager path.
    tb3 = r(5, 9, dtype=t_dtype)
    cases.append((tb3[:, ::2], r(5, 9, dtype=s_dtype)[:, ::2], tb3))
    # Same shape, different layouts (contiguous target, transposed source): the eager path.
    cases.append((r(7, 11, dtype=t_dtype), r(11, 7, dtype=s_dtype).t(), None))
    # An empty tensor.
    cases.append((r(0, 3, dtype=t_dtype), r(0, 3, dtype=s_dtype), None))
    return cases


@pytest.mark.parametrize("kind", ["triton", "cpu", "cuda"])
@pytest.mark.parametrize("t_dtype,s_dtype", [(f32, f32), (f16, f32)])
def test_layouts(small_chunks, kind, t_dtype, s_dtype):
    if kind == "triton" and not (HAS_CUDA or triton_interpreted()):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    if kind == "cuda" and (not HAS_CUDA or cuda_extension() is None):
        pytest.skip("needs a GPU and the built sslkernels._C extension")
    device = "cpu" if kind == "cpu" else TRITON_DEVICE
    cases = layout_cases(device, t_dtype, s_dtype)
    targets, sources = [c[0] for c in cases], [c[1] for c in cases]
    bases = [(c[2], c[2].clone()) for c in cases if c[2] is not None]
    momentum = torch.tensor(0.7, device=device)
    want = expected64(targets, sources, momentum)
    impl(kind)(targets, sources, momentum)
    check(targets, want, kind)
    # Outside the views, the buffers are untouched: write the expected view into the saved copy, compare.
    for (base, saved), (t, _, b) in zip(bases, [c for c in cases if c[2] is not None]):
        ref = saved.clone()
        view = ref.as_strided(t.shape, t.stride(), t.storage_offset())
        view.copy_(t)
        assert torch.equal(base, ref), "elements outside the target view changed"


# ------------------------------------------------------------------------------------------ tables


def test_tables_layout():
    pairs = [(torch.zeros(n), torch.zeros(n, dtype=f16)) for n in (1, 8, 9)]
    buf, n_chunks = ema.build_tables(pairs, 8)
    assert n_chunks == 4
    tensors, chunks = buf[:9].view(3, 3), buf[9:].view(4, 2)
    for row, (t, s) in zip(tensors.tolist(), pairs):
        assert row == [t.data_ptr(), s.data_ptr(), t.numel()]
    assert chunks.tolist() == [[0, 0], [1, 0], [2, 0], [2, 8]]


@needs_triton
def test_tables_are_cached_per_tensor_list(small_chunks):
    targets, sources = make_pairs([(5000,), (7,)], f32, f32, TRITON_DEVICE)
    ema._cache.clear()
    impl("triton")(targets, sources, 0.5)
    assert len(ema._cache) == 1
    want = expected64(targets, sources, 0.5)
    impl("triton")(targets, sources, 0.5)  # same tensors: the cached tables serve again
    assert len(ema._cache) == 1
    check(targets, want, "second call")
    others, _ = make_pairs([(5000,), (7,)], f32, f32, TRITON_DEVICE)
    impl("triton")(others, sources, 0.5)
    assert len(ema._cache) == 2


@needs_triton
def test_tables_are_not_reused_for_longer_views_at_the_same_addresses(small_chunks):
    # Views of one buffer at the same addresses but of other lengths are other tables: a cache keyed on the
    # addresses alone would update only the first length's elements (or run past a shorter view).
    t_buf, s_buf = make_pairs([(5000,)], f32, f32, TRITON_DEVICE)
    for n in (1000, 5000, 7):
        t, s = t_buf[0][:n], s_buf[0][:n]
        want = expected64([t_buf[0]], [s_buf[0]], 0.5)[0]
        want[n:] = t_buf[0][n:].double()
        impl("triton")([t], [s], 0.5)
        check([t_buf[0]], [want], f"view of {n}")


# ------------------------------------------------------------------------------------ no host read


def test_cpu_tensor_momentum_is_never_read_on_the_host():
    targets, sources = make_pairs([(33,), (4,)], f16, f32, "cpu")
    targets += [torch.randn(5)]
    sources += [torch.randn(5)]
    momentum = torch.tensor(0.9)
    want = expected64(targets, sources, momentum)
    with forbid_host_reads():
        impl("cpu")(targets, sources, momentum)
    check(targets, want, "cpu")


# ----------------------------------------------------------------------------------- GPU (csrc)


@needs_csrc
@pytest.mark.parametrize("momentum_kind", MOMENTA + ["bf16 tensor", "fp16 tensor"])
@pytest.mark.parametrize("t_dtype,s_dtype", GPU_PAIRS)
def test_csrc_matches_triton_and_float64(small_chunks, t_dtype, s_dtype, momentum_kind):
    shapes = SHAPES + [(4 * 1000 + 1,), (4 * 1000 + 3,)]
    targets, sources = make_pairs(shapes, t_dtype, s_dtype, "cuda")
    twins = [t.clone() for t in targets]
    momentum = make_momentum(momentum_kind, 0.9, "cuda")
    want = expected64(targets, sources, momentum)
    impl("cuda")(targets, sources, momentum)
    impl("triton")(twins, sources, momentum)
    check(targets, want, "cuda")
    check(twins, want, "triton")
    for a, b in zip(targets, twins):
        # Same fp32 (fp64) formula and one rounding: the two kernels may differ by an fma at most.
        assert_close(a, b.double(), a.dtype, name="cuda vs triton")


@needs_csrc
def test_csrc_unaligned_views_take_the_scalar_path(small_chunks):
    base_t, base_s = torch.randn(9000, device="cuda"), torch.randn(9000, device="cuda", dtype=bf16)
    for offset in (1, 2, 3):
        t, s = base_t[offset:offset + 5003], base_s[offset + 1:offset + 5004]
        want = expected64([t], [s], 0.6)
        impl("cuda")([t], [s], 0.6)
        check([t], want, f"offset {offset}")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU: CUDA graphs")
@pytest.mark.parametrize("kind", ["triton", "cuda"])
def test_graph_capture_after_warm_up(kind):
    if kind == "cuda" and cuda_extension() is None:
        pytest.skip("sslkernels._C is not built")
    targets, sources = make_pairs([(5000,), (7,)], f32, bf16, "cuda")
    momentum = torch.tensor(0.9, device="cuda")
    fresh, fresh_sources = make_pairs([(5,)], f32, f32, "cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="eager"):
        with torch.cuda.graph(graph):  # never seen before: its tables cannot be built while capturing
            impl(kind)(fresh, fresh_sources, momentum)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        impl(kind)(targets, sources, momentum)  # warm-up: tables (and Triton's compile)
    torch.cuda.current_stream().wait_stream(side)
    start = [t.clone() for t in targets]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        impl(kind)(targets, sources, momentum)
    for t, s in zip(targets, start):
        t.copy_(s)
    momentum.fill_(0.5)  # read on the device at replay time
    graph.replay()
    torch.cuda.synchronize()
    check(targets, expected64(start, sources, 0.5), "replay")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU: a tensor past 2^31 elements")
@pytest.mark.parametrize("kind", ["triton", "cuda"])
def test_gpu_tensor_past_int32_elements(kind):
    # Chunks that start past 2^31 elements: element offsets must be int64 (the interpreter computes in int64
    # whatever the kernel says, so only a GPU shows a wrapped offset).
    if kind == "cuda" and cuda_extension() is None:
        pytest.skip("sslkernels._C is not built")
    n = (1 << 31) + 4100
    if torch.cuda.mem_get_info()[0] < 3 * n * 2:
        pytest.skip("needs ~13 GB of free GPU memory")
    t = torch.ones(n, dtype=f16, device="cuda")
    s = torch.full((n,), 3.0, dtype=f16, device="cuda")
    impl(kind)([t], [s], 0.5)
    del s
    assert int((t != 2).sum()) == 0


# ------------------------------------------------------------------------------ extension module


@pytest.mark.skipif(cuda_extension() is None, reason="sslkernels._C is not built")
def test_extension_info_and_no_crash_without_gpu():
    ext = cuda_extension()
    assert all(isinstance(a, int) and a >= 80 for a in ext.cuda_arch_list()) and ext.cuda_arch_list()
    assert ext.dtypes == {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3}
    assert ext.runtime_version() > 0
    assert ext.abi_version == CSRC_ABI_VERSION
    if HAS_CUDA:
        assert ext.device_count() >= 1
        return
    assert ext.device_count() == 0
    # A kernel call without a GPU (or driver) is a Python error, not a crash.
    with pytest.raises(RuntimeError, match="sslkernels._C"):
        ext.ema_update(16, 16, 1, 1024, 0, 0, 0, 0, 0.5, 0)
    with pytest.raises(ValueError, match="chunk_size"):
        ext.ema_update(16, 16, 1, 1022, 0, 0, 0, 0, 0.5, 0)


def test_the_python_side_asks_for_the_abi_version_the_sources_build():
    # A bump on one side only makes every _C look stale: the GPU machine would ignore a fresh build and skip every
    # csrc test as "not built". Read from the source, so a machine without nvcc catches it too.
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "csrc" / "bindings.cpp").read_text()
    (version,) = re.findall(r"constexpr int kAbiVersion = (\d+);", text)
    assert int(version) == CSRC_ABI_VERSION


@pytest.mark.parametrize("version", [None, CSRC_ABI_VERSION - 1])
def test_a_stale_extension_is_ignored_with_a_warning(monkeypatch, version):
    # A _C built from older sources (an in-place build left next to newer Python) takes this package's
    # arguments with other meanings (a missing `cut` was a TypeError; a changed meaning a silent wrong result):
    # it is ignored, so "auto" falls back and backend="cuda" reports it unavailable.
    import sys
    import types

    import sslkernels

    stale = types.ModuleType("sslkernels._C")
    stale.__file__ = "/old/_C.so"
    if version is not None:
        stale.abi_version = version
    monkeypatch.setitem(sys.modules, "sslkernels._C", stale)
    monkeypatch.setattr(sslkernels, "_C", stale, raising=False)
    with pytest.warns(RuntimeWarning, match=r"built from other sources.*rebuild"):
        assert cuda_extension() is None
    stale.abi_version = CSRC_ABI_VERSION
    assert cuda_extension() is stale


# ------------------------------------------------------------------------------------------ autograd


@pytest.mark.parametrize("kind", ["triton", "cpu", "cuda"])
def test_every_kind_bumps_the_targets_version_counters(small_chunks, kind):
    # The kernels write through raw addresses, invisible to autograd: the impls bump the counters themselves
    # (kernel pairs and eager-fallback pairs alike), as the eager ops do.
    if kind == "triton" and not (HAS_CUDA or triton_interpreted()):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    if kind == "cuda" and (not HAS_CUDA or cuda_extension() is None):
        pytest.skip("needs a GPU and the built sslkernels._C extension")
    device = "cpu" if kind == "cpu" else TRITON_DEVICE
    targets, sources = make_pairs([(5000,), (7,)], f32, f16, device)
    targets.append(torch.randn(6, 10, device=device)[:, ::2])  # not dense: the eager path
    sources.append(torch.randn(6, 5, device=device))
    before = [t._version for t in targets]
    impl(kind)(targets, sources, torch.tensor(0.5, device=device))
    assert all(t._version > v for t, v in zip(targets, before)), [(t._version, v) for t, v in zip(targets, before)]


def test_an_absent_extension_is_quietly_unavailable(monkeypatch, tmp_path):
    # No _C at all (a CPU machine, an install without nvcc) is the common case: None without a warning. The
    # from-import used before raised a plain ImportError there, which read as a broken build and warned.
    import sys
    import warnings

    import sslkernels

    monkeypatch.delitem(sys.modules, "sslkernels._C", raising=False)
    monkeypatch.delattr(sslkernels, "_C", raising=False)
    monkeypatch.setattr(sslkernels, "__path__", [str(tmp_path)])  # submodules are looked up here: none
    # (an editable install's finder maps sslkernels._C to the checkout whatever __path__ says: left out)
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if "editable" not in repr(f).lower()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cuda_extension() is None
