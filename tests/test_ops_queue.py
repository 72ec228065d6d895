"""MemoryQueue's enqueue implementations ("torch", "triton", "cuda") against a row-by-row model of the ring
buffer written in the test.

Device-aware: on a GPU machine every kind runs on CUDA tensors (the interpreter is off there); without a
GPU "triton" runs on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py) and "cuda" (the csrc
extension) is skipped.
"""
import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F

import sslkernels
from conftest import HAS_CUDA
from sslkernels.backends import available, cuda_extension, triton_interpreted

f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

DEVICE = "cuda" if HAS_CUDA else "cpu"
HAS_CSRC = HAS_CUDA and cuda_extension() is not None
needs_csrc = pytest.mark.skipif(not HAS_CSRC, reason="needs a GPU and the built sslkernels._C extension")
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")


def runnable(kind):
    if kind == "triton" and not (HAS_CUDA or triton_interpreted()):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    if kind == "cuda" and not HAS_CSRC:
        pytest.skip("needs a GPU and the built sslkernels._C extension")
    return available("queue_enqueue_")[kind]


def ring_model(queue, ptr, keys, normalize):
    """Write every row in order, one at a time: the definition the fused kernels must match."""
    q = queue.detach().to("cpu", torch.float64).clone()
    p = int(ptr)
    for row in keys.detach().to("cpu", torch.float64):
        q[p] = F.normalize(row, dim=0) if normalize else row
        p = (p + 1) % q.shape[0]
    return q, p


def bank_model(queue, ptr, keys, normalize):
    """lightly's MemoryBankModule rule (cut=True), as lightly 1.6.0 writes it with a host-side pointer."""
    q = queue.detach().to("cpu", torch.float64).clone()
    p, size = int(ptr), q.shape[0]
    rows = keys.detach().to("cpu", torch.float64)
    rows = F.normalize(rows, dim=1) if normalize else rows
    if p + rows.shape[0] >= size:
        q[p:] = rows[:size - p]
        return q, 0
    q[p:p + rows.shape[0]] = rows
    return q, p + rows.shape[0]


def tol(queue_dtype, keys_dtype):
    # One rounding into the queue's dtype (plus the keys' own precision when normalizing).
    worst = max((queue_dtype, keys_dtype), key=lambda d: torch.finfo(d).eps)
    return {f64: 1e-12, f32: 1e-6, f16: 2e-3, bf16: 1e-2}[worst]


def check_enqueue(kind, size, dim, start, batch, normalize, q_dtype, k_dtype, *, keys=None, cut=False):
    queue = torch.randn(size, dim, dtype=f64).to(DEVICE, q_dtype)
    ptr = torch.tensor(start, device=DEVICE)
    if keys is None:
        keys = (torch.randn(batch, dim, dtype=f64) * 3).to(DEVICE, k_dtype)
    want, want_ptr = (bank_model if cut else ring_model)(queue, ptr, keys, normalize)
    ptr_addr, queue_addr = ptr.data_ptr(), queue.data_ptr()
    runnable(kind)(queue, ptr, keys, normalize, cut)
    assert ptr.dtype == torch.int64 and ptr.dim() == 0 and ptr.data_ptr() == ptr_addr
    assert queue.data_ptr() == queue_addr and queue.dtype == q_dtype
    assert int(ptr) == want_ptr
    t = tol(q_dtype, k_dtype)
    # Rows the batch never reaches are untouched: the model copied them, compare exactly there too.
    torch.testing.assert_close(queue.double().cpu(), want.to(q_dtype).double(), rtol=t, atol=t)
    return queue, ptr


KINDS = ["torch", "triton", "cuda"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [1, 3, 10, 17, 31])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", [f32, f16])
def test_enqueue_matches_ring_model(kind, batch, normalize, dtype):
    # size 10 from ptr 6: wrap-around; batches 17 and 31 are larger than the queue (last 10 rows kept).
    check_enqueue(kind, 10, 7, 6, batch, normalize, dtype, dtype)


DTYPE_PAIRS = [(q, k) for q in (f32, f16, bf16) for k in (f32, f16, bf16)] + [(f64, f64), (f32, f64), (f64, f16)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("q_dtype,k_dtype", DTYPE_PAIRS, ids=str)
def test_enqueue_dtype_combinations(kind, q_dtype, k_dtype):
    check_enqueue(kind, 13, 33, 11, 5, True, q_dtype, k_dtype)
    check_enqueue(kind, 13, 33, 4, 30, False, q_dtype, k_dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cut", [False, True])
def test_enqueue_normalizes_before_rounding_into_the_queue(kind, cut):
    # Keys outside the queue dtype's range (fp32 rows of norm ~1e6 or ~1e-9 into an fp16 queue, fp64 rows of
    # ~1e50 into an fp32 one) are fine unit rows once normalized: normalizing after the cast (or from
    # values rounded to the queue's dtype) makes them inf, NaN or zero.
    for q_dtype, k_dtype, scales in ((f16, f32, (1e6, 1e-9, 1.0)), (f32, f64, (1e50, 1e-50, 1.0))):
        keys = torch.randn(3, 11, dtype=f64) * torch.tensor(scales, dtype=f64)[:, None]
        queue, _ = check_enqueue(kind, 5, 11, 3, None, True, q_dtype, k_dtype, keys=keys.to(DEVICE, k_dtype),
                                 cut=cut)
        assert torch.isfinite(queue).all()


@pytest.mark.parametrize("kind", KINDS)
def test_enqueue_strided_keys_and_zero_rows(kind):
    # Keys that are a row-strided view (every other row of a wider buffer), one all-zero row (the 1e-12
    # floor of F.normalize: stays zero, no NaN), and a width that is not a power of two.
    base = (torch.randn(12, 2 * 45, dtype=f64) * 2).to(DEVICE, f32)
    keys = base[::2, 5:50]
    keys[1].zero_()
    assert keys.stride(1) == 1 and not keys.is_contiguous()
    queue, _ = check_enqueue(kind, 8, 45, 3, None, True, f32, f32, keys=keys)
    assert torch.isfinite(queue).all()


@pytest.mark.parametrize("kind", KINDS)
def test_enqueue_batch_equal_to_and_multiple_of_size(kind):
    for batch, start in ((16, 0), (16, 5), (48, 9), (1, 15)):
        check_enqueue(kind, 16, 4, start, batch, False, f32, f32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("start,batch", [(0, 3), (2, 5), (2, 6), (6, 1), (3, 4), (5, 20), (0, 7), (0, 30)])
@pytest.mark.parametrize("normalize", [False, True])
def test_enqueue_cut_matches_lightlys_bank(kind, start, batch, normalize):
    # size 7: a batch that stops short of the end, ends on it (ptr back to 0), passes it (the rest dropped,
    # not wrapped), and is larger than the bank (its first rows from ptr on).
    check_enqueue(kind, 7, 9, start, batch, normalize, f32, f32, cut=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("q_dtype,k_dtype", [(f16, f32), (f32, bf16), (f64, f64)], ids=str)
def test_enqueue_cut_dtypes(kind, q_dtype, k_dtype):
    check_enqueue(kind, 13, 33, 11, 5, True, q_dtype, k_dtype, cut=True)


def test_memory_queue_wraps_and_round_trips_state():
    q = sslkernels.MemoryQueue(8, 5, device=DEVICE)
    assert q.ptr.dtype == torch.long and q.ptr.dim() == 0 and q.ptr.device == q.queue.device
    for b in (3, 3, 3, 11):
        before = q.queue.clone()
        want, want_ptr = ring_model(before, q.ptr, k := torch.randn(b, 5, device=DEVICE), False)
        q.enqueue_(k)
        torch.testing.assert_close(q.queue.double().cpu(), want)
        assert int(q.ptr) == want_ptr
    other = sslkernels.MemoryQueue(8, 5, device=DEVICE)
    other.load_state_dict(q.state_dict())
    assert torch.equal(other.queue, q.queue) and torch.equal(other.ptr, q.ptr)


def test_memory_queue_rejects_bad_keys():
    q = sslkernels.MemoryQueue(8, 5)
    with pytest.raises(ValueError, match="dimension"):
        q.enqueue_(torch.randn(2, 4))
    with pytest.raises(ValueError, match="keys"):
        q.enqueue_(torch.randn(0, 5))
    with pytest.raises(TypeError, match="keys"):
        q.enqueue_(torch.ones(2, 5, dtype=torch.long))
    before = (q.queue.clone(), int(q.ptr))
    with pytest.raises(ValueError, match="keys are on meta but the queue is on cpu"):  # any other device
        q.enqueue_(torch.randn(2, 5, device="meta"))
    assert torch.equal(q.queue, before[0]) and int(q.ptr) == before[1]


def test_memory_queue_plugs_into_moco_loss():
    q = sslkernels.MemoryQueue(16, 6, dtype=torch.float64)
    query, key = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    assert torch.equal(sslkernels.moco_loss(query, key, q), sslkernels.moco_loss(query, key, q.queue))


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    q = sslkernels.MemoryQueue(8, 5)
    with pytest.raises(ValueError, match="cuda"):
        q.enqueue_(torch.randn(2, 5), backend="cuda")


# ----------------------------------------------------------------------------------- GPU (csrc)


@needs_csrc
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("q_dtype,k_dtype", DTYPE_PAIRS, ids=str)
@pytest.mark.parametrize("size,dim,start,batch", [(65536, 128, 65500, 256), (100, 1000, 37, 333),
                                                  (7, 3, 6, 1), (1, 64, 0, 5)])
@pytest.mark.parametrize("cut", [False, True], ids=["ring", "cut"])
def test_csrc_matches_triton_and_reference(size, dim, start, batch, q_dtype, k_dtype, normalize, cut):
    keys = (torch.randn(batch, dim, device="cuda", dtype=f64) * 3).to(k_dtype)
    init = torch.randn(size, dim, device="cuda", dtype=f64).to(q_dtype)
    out = {}
    for kind in KINDS:
        queue, ptr = init.clone(), torch.tensor(start, device="cuda")
        available("queue_enqueue_")[kind](queue, ptr, keys, normalize, cut)
        out[kind] = (queue, ptr)
    want_ptr = (0 if start + batch >= size else start + batch) if cut else (start + batch) % size
    t = tol(q_dtype, k_dtype)
    for kind in ("cuda", "triton"):
        assert int(out[kind][1]) == want_ptr, kind
        # Same formula, one rounding: at most an ulp of the compute dtype apart before the final cast.
        torch.testing.assert_close(out[kind][0].double(), out["torch"][0].double(), rtol=t, atol=t)
    if not normalize and not (k_dtype == f64 and q_dtype in (f16, bf16)):
        # A plain cast rounds once, the same way, in both (fp64 -> fp16/bf16 may round through fp32).
        assert torch.equal(out["cuda"][0], out["torch"][0])


@needs_csrc
def test_csrc_many_blocks_advance_ptr_once():
    # 2^14 rows: two thousand blocks all read ptr through the arrival counter; the last one advances it.
    size, dim = 1 << 15, 16
    queue = torch.zeros(size, dim, device="cuda")
    ptr = torch.tensor(size - 3, device="cuda")
    rows = torch.arange(1 << 14, device="cuda", dtype=f32)[:, None].expand(-1, dim)
    for step in range(5):
        before = int(ptr)
        available("queue_enqueue_")["cuda"](queue, ptr, rows, False)
        assert int(ptr) == (before + rows.shape[0]) % size, f"step {step}"
        idx = (before + torch.arange(rows.shape[0], device="cuda")) % size
        assert torch.equal(queue[idx, 0], rows[:, 0]), f"step {step}"


@contextlib.contextmanager
def sync_debug_error():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_gpu
@pytest.mark.parametrize("cut", [False, True], ids=["ring", "cut"])
@pytest.mark.parametrize("kind", ["triton", "cuda"])
def test_gpu_enqueue_is_sync_free_and_graph_capturable(kind, cut):
    fn = functools.partial(runnable(kind), cut=cut)
    size, dim, batch = 50, 32, 16
    queue = torch.randn(size, dim, device="cuda")
    ptr = torch.tensor(40, device="cuda")
    keys = torch.randn(batch, dim, device="cuda")
    fn(queue, ptr, keys, True)  # warm-up (Triton compiles here)
    torch.cuda.synchronize()
    with sync_debug_error():
        fn(queue, ptr, keys, True)
    start_queue, start_ptr = queue.clone(), int(ptr)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(queue, ptr, keys, True)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        fn(queue, ptr, keys, True)
    queue.copy_(start_queue)
    ptr.fill_(start_ptr)
    for _ in range(3):  # each replay reads the ptr the previous one left
        graph.replay()
    torch.cuda.synchronize()
    if cut:  # lightly's rule, replay by replay: 40 -> 0 (6 rows written, 10 dropped) -> 16 -> 32
        want, want_ptr = start_queue, start_ptr
        for _ in range(3):
            want, want_ptr = bank_model(want, want_ptr, keys, True)
    else:
        want, want_ptr = ring_model(start_queue, start_ptr, torch.cat([keys] * 3), True)
    assert int(ptr) == want_ptr
    torch.testing.assert_close(queue.double().cpu(), want, rtol=1e-6, atol=1e-6)


@needs_csrc
def test_csrc_enqueue_is_one_kernel_launch():
    queue = torch.randn(65536, 128, device="cuda")
    ptr = torch.tensor(0, device="cuda")
    keys = torch.randn(256, 128, device="cuda")
    fn = available("queue_enqueue_")["cuda"]
    fn(queue, ptr, keys, True)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn(queue, ptr, keys, True)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not kernels:
        pytest.skip("the profiler recorded no device activity here (CUPTI unavailable)")
    assert len(kernels) == 1, [e.name for e in kernels]  # the ptr advance included: no extra launch
    assert int(ptr) == 512


# ------------------------------------------------------------------------------ extension module


@pytest.mark.skipif(cuda_extension() is None, reason="sslkernels._C is not built")
def test_extension_enqueue_argument_checks():
    ext = cuda_extension()
    good = dict(queue=256, ptr=512, keys=1024, size=8, dim=4, n_keys=3, queue_stride=4, keys_stride=4,
                queue_dtype=0, keys_dtype=0, normalize=False, cut=False, stream=0)
    for bad, match in (({"queue_dtype": 9}, "dtype"), ({"size": 0}, "size"), ({"n_keys": 0}, "n_keys"),
                       ({"queue_stride": 2}, "stride"), ({"ptr": 0}, "null"), ({"ptr": 516}, "aligned")):
        with pytest.raises(ValueError, match=match):
            ext.queue_enqueue(**{**good, **bad})
    if not HAS_CUDA:
        # A kernel call without a GPU (or driver) is a Python error, not a crash.
        with pytest.raises(RuntimeError, match="sslkernels._C"):
            ext.queue_enqueue(**good)


# ------------------------------------------------------------------------------ compiled numerics


_PTX_SCRIPT = r"""
import sys, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sslkernels.ops import queue as Q

fn = Q._enqueue_kernel
ptx = []
for cut in (False, True):
    const = {"NORMALIZE": True, "CUT": cut, "COMPUTE": tl.float32, "BLOCK_D": 128}
    sig = {n: "constexpr" if n in const else {"keys_ptr": "*fp32", "queue_ptr": "*fp32", "ptr_ptr": "*i64"}.get(n, "i32")
           for n in fn.arg_names}
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=const)
    except TypeError:  # older keyword
        src = ASTSource(fn=fn, signature=sig, constants=const)
    ptx.append(triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=1)).asm["ptx"])
print("\n".join(l.strip() for p in ptx for l in p.splitlines() if "sqrt" in l or "div" in l or "rcp" in l))
"""


def test_triton_enqueue_normalizes_with_ieee_sqrt_and_division():
    # fp32 tl.sqrt and / compile to sqrt.approx and div.full (~2 ulp); csrc/queue.cu and F.normalize round
    # both to nearest. Checked in the sm_90 PTX (compiled offline: no GPU needed; the interpreter hides it).
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any("sqrt.rn.f32" in l for l in lines) and any("div.rn.f32" in l for l in lines), lines
    assert not any(".approx" in l or "div.full" in l for l in lines), lines


# ------------------------------------------------------------------------------ layouts the GPU sees


@pytest.mark.parametrize("kind", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("cut", [False, True], ids=["ring", "cut"])
@pytest.mark.parametrize("normalize", [False, True])
def test_enqueue_rows_of_the_queue_itself(kind, cut, normalize):
    # Keys that are a view of the queue (a slice enqueued again): every row is written as it was before the
    # call. Without a copy, one program (block) reads a row that another has already overwritten: under the
    # interpreter's serial programs rows 4 and 5 came out as rows 0 and 1 again; on a GPU, a race. The torch
    # backend raised index_copy_'s overlap error.
    fn = runnable(kind)
    for start, lo, hi in ((2, 0, 4), (8, 3, 9), (0, 1, 10)):
        queue = torch.arange(10 * 3, dtype=f32).reshape(10, 3).to(DEVICE)
        ptr = torch.tensor(start, device=DEVICE)
        keys = queue[lo:hi]
        want, want_ptr = (bank_model if cut else ring_model)(queue, ptr, keys.clone(), normalize)
        fn(queue, ptr, keys, normalize, cut)
        assert int(ptr) == want_ptr
        torch.testing.assert_close(queue.double().cpu(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["triton", "cuda"])
@pytest.mark.parametrize("dim", [4096 * 2 + 5, (1 << 20) + 1], ids=["2x4096+5", "2^20+1"])
@pytest.mark.parametrize("cut", [False, True], ids=["ring", "cut"])
def test_enqueue_wide_rows(kind, dim, cut):
    # A row wider than one program's block: the Triton kernel held the whole row (next_pow2(D) elements),
    # which spilled from D = 32768 on and did not compile past 2^20 (Triton's largest tensor).
    check_enqueue(kind, 3, dim, 2, 2, True, f32, f32, cut=cut)
    if dim < 1 << 20:
        check_enqueue(kind, 3, dim, 1, 4, False, f16, f32, cut=cut)


@needs_gpu
@pytest.mark.parametrize("kind", ["triton", "cuda"])
@pytest.mark.parametrize("cut", [False, True], ids=["ring", "cut"])
def test_gpu_rows_past_int32_elements(kind, cut):
    # Rows from 65536 on start past 2^31 elements of a D = 32768 queue: row offsets must be int64 (the
    # interpreter computes in int64 whatever the kernel says, so only a GPU shows a wrapped offset).
    fn = runnable(kind)
    size, dim = 66000, 32768
    if torch.cuda.mem_get_info()[0] < 3 * size * dim * 2:
        pytest.skip("needs ~13 GB of free GPU memory")
    queue = torch.zeros(size, dim, dtype=f16, device="cuda")
    ptr = torch.tensor(size - 5, device="cuda")
    keys = torch.arange(1, 13, dtype=f16, device="cuda")[:, None].expand(12, dim)
    fn(queue, ptr, keys, False, cut)
    assert int(ptr) == (0 if cut else 7)
    assert torch.equal(queue[size - 5:, ::4096], keys[:5, ::4096])
    assert torch.equal(queue[:7, ::4096], torch.zeros_like(keys[:7, ::4096]) if cut else keys[5:, ::4096])
    assert int((queue[7:size - 5] != 0).sum()) == 0
    del queue
