"""DINO's loss and centre update (the Triton kernels under the interpreter, and the memory-efficient CPU
path) against float64 math written here: the official pair loop over (teacher crop, student crop)."""
import os

import pytest
import torch

import sslkernels
from conftest import HAS_CUDA, assert_close, launches

pytest.importorskip("triton")
from sslkernels.ops import dino, dino_cpu, dino_fused  # noqa: E402


def fused_dino_loss(*args):
    """The Triton loss with the gradient formed in the forward (ops/dino_fused.py)."""
    old = os.environ.get("SSLKERNELS_DINO_FUSED")
    os.environ["SSLKERNELS_DINO_FUSED"] = "1"
    try:
        return dino.dino_loss(*args)
    finally:
        if old is None:
            del os.environ["SSLKERNELS_DINO_FUSED"]
        else:
            os.environ["SSLKERNELS_DINO_FUSED"] = old


KINDS = {"triton": dino.dino_loss, "fused": fused_dino_loss, "cpu": dino_cpu.dino_loss}
# Triton runs on the GPU where there is one, else on CPU tensors under the interpreter.
_TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
DEVICE = {"triton": _TRITON_DEVICE, "fused": _TRITON_DEVICE, "cpu": "cpu"}
ALL_KINDS = ["triton", "fused", "cpu"]


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    # Tiny inputs must still cross several P-tiles and P-splits, with a ragged last tile, and the fused
    # kernel's persistent programs must take several rows each, some one more than others.
    monkeypatch.setattr(dino, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(dino, "TARGET_PROGRAMS", 8)
    monkeypatch.setattr(dino_fused, "BLOCK_P", 16)
    monkeypatch.setattr(dino_fused, "TEACHER_BLOCK", 16)
    monkeypatch.setattr(dino_fused, "INTERPRETER_PROGRAMS", 3)
    monkeypatch.setenv("SSLKERNELS_DINO_FUSED_PROGRAMS", "3")  # on a GPU as well


def dino64(student, teacher, center, student_temp, teacher_temp, n_global, reduction):
    """The official DINOLoss, in float64: every pair (a, b ≠ a) of teacher and student crops."""
    s, t, c = student.double(), teacher.double(), center.double().reshape(1, -1)
    tt = teacher_temp.double() if isinstance(teacher_temp, torch.Tensor) else teacher_temp
    b = t.shape[0] // n_global
    t_probs = torch.softmax((t - c) / tt, dim=-1).chunk(n_global)
    s_logp = torch.log_softmax(s / student_temp, dim=-1).chunk(s.shape[0] // b)
    terms = [(-ta * sv).sum(dim=-1) for a, ta in enumerate(t_probs) for v, sv in enumerate(s_logp) if v != a]
    rows = torch.stack(terms).mean(dim=0)
    return {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]


def check(kind, G, S, B, P, dtype, reduction, teacher_temp=0.04, scale=1.0, student_temp=0.1, grad_rtol=None,
          offset=0.0):
    student = (torch.randn(S * B, P) * scale + offset).to(dtype)
    teacher = (torch.randn(G * B, P) * scale + offset).to(dtype)
    center = torch.randn(1, P) * 0.3 * scale
    s64 = student.double().requires_grad_()
    want = dino64(s64, teacher, center, student_temp, teacher_temp, G, reduction)
    weights = torch.rand_like(want) + 0.5  # a non-uniform upstream gradient for "none"
    (want_grad,) = torch.autograd.grad((want * weights).sum(), s64)

    dev = DEVICE[kind]
    s = student.to(dev).requires_grad_()
    tt = teacher_temp.to(dev) if isinstance(teacher_temp, torch.Tensor) else teacher_temp
    got = KINDS[kind](s, teacher.to(dev), center.to(dev), student_temp, tt, G, reduction)
    assert got.dtype == torch.promote_types(dtype, torch.float32)
    (grad,) = torch.autograd.grad((got * weights.to(got)).sum(), s)
    assert grad.dtype == dtype
    assert_close(got, want, dtype, name="loss")
    # Gradients are held to the tolerance relative to their own largest entry, not to 1.
    assert_close(grad, want_grad, dtype, rtol=grad_rtol, atol=0.0, name="student grad")


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("G,S,B,P", [(2, 4, 3, 131), (2, 2, 1, 64), (1, 3, 2, 100), (3, 2, 2, 77), (2, 1, 3, 33)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dino_loss_matches_float64(kind, G, S, B, P, reduction):
    check(kind, G, S, B, P, torch.float32, reduction)


@pytest.mark.parametrize("kind", ALL_KINDS)
# bf16 runs under the interpreter too: these kernels use no tl.dot.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dino_loss_dtypes(kind, dtype):
    check(kind, 2, 3, 3, 101, dtype, "mean")


@pytest.mark.skipif(not HAS_CUDA, reason="a GPU-sized bf16 case (the small ones run under the interpreter)")
@pytest.mark.parametrize("kind", ["triton", "fused"])
def test_dino_loss_bf16_cuda(kind):
    G, S, B, P = 2, 6, 5, 4099
    student = torch.randn(S * B, P, device="cuda").bfloat16().requires_grad_()
    teacher = torch.randn(G * B, P, device="cuda").bfloat16()
    center = torch.randn(1, P, device="cuda") * 0.1
    got = KINDS[kind](student, teacher, center, 0.1, 0.04, G, "mean")
    (grad,) = torch.autograd.grad(got, student)
    s64 = student.detach().cpu().double().requires_grad_()
    want = dino64(s64, teacher.cpu(), center.cpu(), 0.1, 0.04, G, "mean")
    (want_grad,) = torch.autograd.grad(want, s64)
    assert_close(got, want, torch.bfloat16)
    assert_close(grad, want_grad, torch.bfloat16, atol=0.0)


@pytest.mark.parametrize("offset", [100.0, -100.0])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_dino_loss_logits_with_a_common_offset(kind, offset):
    # Softmaxes do not see an offset, and neither may the loss: the fused kernel's n_b·lse − Σ t·s/τs leaned on
    # Σ_p t = 1, which its separately rounded teacher LSE misses, by an error times |s|/τs (6e-4 relative here).
    # The gradient's bound is the exponents' own fp32 rounding, as in the extreme-logits test.
    # −100: every centred teacher exponent is ~−2500 and every student one ~−1000, so the P-split merge must pad
    # its unused split slots (3 splits in a power-of-two 4 here) with maxima below those, not 0 (exp(−2500 − 0)
    # = 0: a NaN loss), for the teacher rows and the student rows alike.
    check(kind, 2, 4, 3, 97, torch.float32, "none", offset=offset, grad_rtol=2.0 ** -24 * 4 * 104.0 / 0.04)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_dino_loss_rows_to_a_few_fp32_ulps(kind):
    # Σ_p t must be 1 to fp32's rounding, not to the rounding of the teacher's LSE (an ulp of |t − c|/τt ≈ 8e-6,
    # which every t of the row inherits, and the loss with it): the fused kernel's t = exp(u − lse) had rows
    # 8e-6 off here (now 3e-7, as the two-pass kernel). The loss rows against float64 to 1e-6 relative.
    G, S, B, P = 2, 3, 8, 2053  # 16 teacher rows: each has its own LSE rounding
    student, teacher = torch.randn(S * B, P) * 3, torch.randn(G * B, P) * 3
    center = torch.randn(1, P) * 0.3
    want = dino64(student.double(), teacher, center, 0.1, 0.04, G, "none")
    dev = DEVICE[kind]
    got = KINDS[kind](student.to(dev).requires_grad_(), teacher.to(dev), center.to(dev), 0.1, 0.04, G, "none")
    assert_close(got, want, torch.float32, rtol=1e-6, atol=0.0, name="loss rows")


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_dino_loss_tensor_teacher_temp(kind):
    check(kind, 2, 3, 2, 90, torch.float32, "none", teacher_temp=torch.tensor(0.07))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_dino_loss_extreme_logits(kind):
    # Logits ×1000 over temperatures 0.1 / 0.04: exponents of ±10⁵, far past float32's exp range.
    # Nothing may overflow, and the loss keeps fp32's tolerance. The gradient cannot: rounding the
    # exponents themselves in fp32 ((t − c)/τt ≈ 10⁵ has an ulp of ~0.008) moves every softmax entry by up
    # to max|exponent|·2⁻²⁴ relative (max|exponent| ≈ 4σ·1000/0.04), for any fp32 algorithm: the bound
    # below, ~6e-3 (the GPU measured 1.5e-3), still far under the O(1) error of an overflow or a wrong LSE.
    check(kind, 2, 4, 3, 97, torch.float32, "mean", scale=1000.0, grad_rtol=2.0 ** -24 * 4 * 1000.0 / 0.04)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_dino_loss_center_updated_before_backward(kind):
    # Official DINO calls update_center() inside forward, i.e. between the loss and its backward.
    G, S, B, P = 2, 3, 2, 50
    student = torch.randn(S * B, P, requires_grad=True)
    teacher, center = torch.randn(G * B, P), torch.randn(1, P)
    s64 = student.detach().double().requires_grad_()
    (want_grad,) = torch.autograd.grad(dino64(s64, teacher, center, 0.1, 0.04, G, "mean"), s64)
    dev = DEVICE[kind]
    temp, center = torch.tensor(0.04, device=dev), center.to(dev)
    leaf = student.detach().to(dev).requires_grad_()
    loss = KINDS[kind](leaf, teacher.to(dev), center, 0.1, temp, G, "mean")
    center.add_(5.0)
    temp.fill_(0.5)
    loss.backward()
    assert_close(leaf.grad, want_grad, torch.float32, atol=0.0)


@pytest.mark.parametrize("backend", ["triton", "auto", "torch"])
def test_dino_loss_public_api(backend):
    G, S, B, P = 2, 4, 2, 70
    dev = DEVICE["triton"] if backend == "triton" else "cpu"
    student = torch.randn(S * B, P, device=dev, requires_grad=True)
    teacher, center = torch.randn(G * B, P, device=dev), torch.randn(P, device=dev)
    got = sslkernels.dino_loss(student, teacher, center, n_global_crops=G, backend=backend)
    got.backward()
    s64 = student.detach().cpu().double().requires_grad_()
    want = dino64(s64, teacher.cpu(), center.cpu(), 0.1, 0.04, G, "mean")
    want.backward()
    assert_close(got, want, torch.float32)
    assert_close(student.grad, s64.grad, torch.float32, atol=0.0)


def test_dino_loss_no_grad_forward():
    student, teacher, center = torch.randn(6, 40), torch.randn(4, 40), torch.zeros(1, 40)
    dev = DEVICE["triton"]
    with torch.no_grad():
        got = dino.dino_loss(student.to(dev), teacher.to(dev), center.to(dev), 0.1, 0.04, 2, "sum")
    assert_close(got, dino64(student, teacher, center, 0.1, 0.04, 2, "sum"), torch.float32)


# ------------------------------------------------------------------------------------- update_center_


def center64(center, teacher, momentum):
    m = float(momentum)
    return center.cpu().double() * m + teacher.cpu().double().mean(dim=0).reshape(center.shape) * (1 - m)


@pytest.mark.parametrize("N,P", [(1, 5), (7, 131), (70, 300)])
@pytest.mark.parametrize("momentum", [0.9, "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_update_center_matches_float64(N, P, momentum, dtype):
    teacher = torch.randn(N, P).to(dtype)
    center = torch.randn(1, P).to(dtype)
    m = torch.tensor(0.8) if momentum == "tensor" else momentum
    want = center64(center, teacher, m)
    dev = DEVICE["triton"]
    center, teacher = center.to(dev), teacher.to(dev)
    out = dino.update_center_(center, teacher, m.to(dev) if isinstance(m, torch.Tensor) else m)
    assert out is center and center.dtype == dtype
    assert_close(center, want, dtype, atol=0.0)


def test_update_center_flat_and_noncontiguous_center():
    dev = DEVICE["triton"]
    teacher = torch.randn(9, 40, device=dev)
    flat = torch.randn(40, device=dev)
    want = center64(flat, teacher, 0.7)
    dino.update_center_(flat, teacher, 0.7)
    assert_close(flat, want, torch.float32)
    strided = torch.randn(40, 2, device=dev)[:, 0]
    want = center64(strided, teacher, 0.5)
    dino.update_center_(strided, teacher, 0.5)
    assert_close(strided, want, torch.float32)


@pytest.mark.parametrize("backend", ["triton", "torch", "auto"])
def test_update_center_counts_as_an_in_place_write(backend):
    # A graph that saved the centre must raise on backward after the update, on the kernel path too (it
    # writes through a raw pointer), instead of differentiating against the new centre.
    dev = DEVICE["triton"] if backend == "triton" else "cpu"
    center = torch.randn(1, 33, device=dev)
    x = torch.randn(1, 33, device=dev, requires_grad=True)
    y = (x * center).sum()
    sslkernels.update_center_(center, torch.randn(12, 33, device=dev), 0.9, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_update_center_public_api():
    dev = DEVICE["triton"]
    teacher, center = torch.randn(12, 33, device=dev), torch.randn(1, 33, device=dev)
    want = center64(center, teacher, 0.9)
    sslkernels.update_center_(center, teacher, 0.9, backend="triton")
    assert_close(center, want, torch.float32)


def _two_fake_ranks(monkeypatch):
    """Pretend to be one of two ranks holding the same rows: all-reduces double their input."""
    from sslkernels import distributed

    def all_reduce_sum(x, group=None, async_op=False):
        x.mul_(2)
        return (x, None) if async_op else x

    monkeypatch.setattr(dino, "is_distributed", lambda group=None: True)
    monkeypatch.setattr(distributed, "world_size", lambda group=None: 2)
    monkeypatch.setattr(distributed, "all_reduce_sum", all_reduce_sum)


@pytest.mark.parametrize("momentum", [0.6, "tensor"])
def test_update_center_distributed_path(monkeypatch, momentum):
    # Two ranks holding the same rows: the all-reduced mean equals this rank's mean. Exercises the
    # column-sum kernel + torch all-reduce + EMA branch without a process group.
    _two_fake_ranks(monkeypatch)
    dev = DEVICE["triton"]
    teacher, center = torch.randn(11, 37, device=dev), torch.randn(1, 37, device=dev)
    m = torch.tensor(0.6, device=dev) if momentum == "tensor" else momentum
    want = center64(center, teacher, 0.6)
    dino.update_center_(center, teacher, m)
    assert_close(center, want, torch.float32, atol=0.0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_update_center_async(backend, dtype):
    # DINOv2: the all-reduce is started now, the EMA applied on wait(), once; the centre is untouched before.
    dev = DEVICE["triton"] if backend == "triton" else "cpu"
    teacher, center = torch.randn(9, 45).to(dtype), torch.randn(1, 45).to(dtype)
    want = center64(center, teacher, 0.8)
    center, before = center.to(dev), center.clone()
    handle = sslkernels.update_center_(center, teacher.to(dev), torch.tensor(0.8, device=dev), async_op=True,
                                       backend=backend)
    assert torch.equal(center.cpu(), before)
    assert handle.is_completed()  # single process: nothing in flight
    assert handle.wait() is center and handle.wait() is center
    assert_close(center, want, dtype, atol=0.0)


def test_update_center_async_distributed_path(monkeypatch):
    _two_fake_ranks(monkeypatch)
    dev = DEVICE["triton"]
    teacher, center = torch.randn(5, 19, device=dev), torch.randn(19, device=dev)
    want = center64(center, teacher, 0.9)
    handle = dino.update_center_(center, teacher, 0.9, True, None)
    assert_close(handle.wait(), want, torch.float32, atol=0.0)


# ------------------------------------------------------------------------------- edge cases, numerics


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_dino_loss_fp16_extreme_logits(kind):
    # fp16 logits near its range (±3·10⁴) at τt = 0.04, τs = 0.1: exponents of ~10⁶, finite result.
    check(kind, 2, 3, 2, 67, torch.float16, "none", scale=1e4)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_dino_loss_one_sample_one_prototype_column_ragged(kind):
    # B = 1, P = 1 (every softmax is exactly 1: loss and gradient 0) and P = 17 (ragged last tile).
    check(kind, 2, 3, 1, 1, torch.float32, "mean")
    check(kind, 1, 2, 1, 17, torch.float32, "sum", teacher_temp=torch.tensor(0.04))


@pytest.mark.parametrize("backend", ["triton", "auto", "torch"])
def test_dino_loss_teacher_temp_gets_no_gradient(backend):
    dev = DEVICE["triton"] if backend == "triton" else "cpu"
    student = torch.randn(6, 20, device=dev, requires_grad=True)
    teacher, center = torch.randn(4, 20, device=dev), torch.zeros(20, device=dev)
    temp = torch.tensor(0.05, device=dev, requires_grad=True)
    loss = sslkernels.dino_loss(student, teacher, center, teacher_temp=temp, backend=backend)
    grads = torch.autograd.grad(loss, [student, temp], allow_unused=True)
    assert grads[1] is None or not grads[1].any()
    assert torch.isfinite(grads[0]).all()


def test_stream_split_fills_the_gpu_at_the_paper_size():
    from sslkernels.ops._common import MAX_SPLITS, STREAM_PROGRAMS, stream_split
    # DINO B = 64, P = 65536 in 256-wide tiles: 64 splits of 4 tiles, 4096 programs (~31 per H100 SM).
    assert stream_split(256, 64, STREAM_PROGRAMS) == (4, 64)
    assert stream_split(1000, 1, STREAM_PROGRAMS)[1] <= MAX_SPLITS
    assert stream_split(3, 10_000, STREAM_PROGRAMS) == (3, 1)  # enough programs already: no split
    per, n = stream_split(9, 2, 8)
    assert per * n >= 9 and per * (n - 1) < 9  # every tile covered, no empty split


# --------------------------------------------------------------------------- gradient in the forward


def test_dino_fused_backward_recomputes_only_non_unit_samples(monkeypatch):
    # The first backward hands out the forward's gradient, recomputing only the samples whose upstream
    # gradient is not exactly 1 (here sample 1 of 3); a retain_graph backward after it recomputes all.
    G, S, B, P = 2, 3, 3, 45
    student, teacher, center = torch.randn(S * B, P), torch.randn(G * B, P), torch.randn(1, P)
    weights = torch.tensor([1.0, 2.5, 1.0])
    s64 = student.double().requires_grad_()
    (want,) = torch.autograd.grad((dino64(s64, teacher, center, 0.1, 0.04, G, "none") * weights).sum(), s64)
    dev = DEVICE["fused"]
    leaf = student.to(dev).requires_grad_()
    loss = fused_dino_loss(leaf, teacher.to(dev), center.to(dev), 0.1, 0.04, G, "none")
    kernel, skips = dino._dino_bwd_kernel, []

    class _Recording:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                skips.append(kw["SKIP_UNIT"])
                return kernel[grid](*args, **kw)
            return launch

    monkeypatch.setattr(dino, "_dino_bwd_kernel", _Recording())
    (first,) = torch.autograd.grad(loss, leaf, weights.to(dev), retain_graph=True)
    (second,) = torch.autograd.grad(loss, leaf, weights.to(dev))
    assert skips == [True, False]
    assert_close(first, want, torch.float32, atol=0.0, name="first backward")
    assert_close(second, want, torch.float32, atol=0.0, name="second backward")


def test_dino_fused_skips_the_gradient_when_nothing_needs_it(monkeypatch):
    monkeypatch.setenv("SSLKERNELS_DINO_FUSED", "1")
    monkeypatch.setattr(dino_fused, "forward_with_grad", None)  # calling it would raise
    student, teacher, center = torch.randn(6, 40), torch.randn(4, 40), torch.zeros(1, 40)
    dev = DEVICE["fused"]
    got = dino.dino_loss(student.to(dev), teacher.to(dev), center.to(dev), 0.1, 0.04, 2, "mean")
    assert_close(got, dino64(student, teacher, center, 0.1, 0.04, 2, "mean"), torch.float32)


def test_dino_fused_program_count(monkeypatch):
    # Off the GPU: the interpreter's grid. On it: at least one program per SM, and an override for sweeps.
    monkeypatch.delenv("SSLKERNELS_DINO_FUSED_PROGRAMS")
    assert dino_fused._programs(2, 1 << 18, torch.device("cpu")) == 2
    assert dino_fused._programs(100, 1 << 18, torch.device("cpu")) == dino_fused.INTERPRETER_PROGRAMS
    if HAS_CUDA:
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        assert sms <= dino_fused._programs(10_000, 1 << 18, torch.device("cuda")) <= 4 * sms
    monkeypatch.setenv("SSLKERNELS_DINO_FUSED_PROGRAMS", "7")
    assert dino_fused._programs(100, 1 << 18, torch.device("cpu")) == 7
    assert dino_fused._programs(5, 1 << 18, torch.device("cpu")) == 5


@pytest.mark.parametrize("stages", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dino_fused_pipelined_walks(monkeypatch, stages, dtype):
    # The software-pipelined loops the GPU sweep may pick (tl.range num_stages; the interpreter ignores it).
    monkeypatch.setenv("SSLKERNELS_DINO_FUSED_STAGES", str(stages))
    check("fused", 2, 5, 3, 203, dtype, "none")


@pytest.mark.parametrize("block", [32, 64])
def test_dino_fused_block_override(monkeypatch, block):
    # SSLKERNELS_DINO_FUSED_BLOCK (the GPU sweep's tile width) reaches the kernel and any width it sets is right:
    # tiles of 32 and 64 over P = 203 (ragged), against the fixture's 16.
    monkeypatch.setenv("SSLKERNELS_DINO_FUSED_BLOCK", str(block))
    with launches() as recorded:
        check("fused", 2, 5, 3, 203, torch.float32, "none")
    seen = [kw["BLOCK"] for name, _, kw in recorded if name == "_dino_fused_kernel"]
    assert seen and set(seen) == {block}, seen


@pytest.mark.parametrize("crops", [2, 4, 8])
@pytest.mark.parametrize("G,S,B,P", [(2, 5, 3, 71), (3, 2, 2, 40), (1, 3, 2, 33)])
def test_dino_fused_several_crops_per_item(monkeypatch, crops, G, S, B, P):
    # Items of several crops of a sample, the last one ragged (S = 5 in pairs or fours), global crops
    # (own teacher left out) and local ones in the same item, G > S; 8 is capped at S's power of two.
    monkeypatch.setenv("SSLKERNELS_DINO_FUSED_CROPS", str(crops))
    check("fused", G, S, B, P, torch.float32, "none")
    check("fused", G, S, B, P, torch.float16, "mean")


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_dino_loss_strided_rows(kind):
    # Student and teacher as column slices of wider buffers (row stride > P): the kernels index by stride.
    G, S, B, P = 2, 3, 2, 37
    dev = DEVICE[kind]
    wide_s = torch.randn(S * B, P + 11)
    wide_t = torch.randn(G * B, P + 5)
    center = torch.randn(1, P)
    leaf = wide_s.to(dev).requires_grad_()
    student, teacher = leaf[:, 3:3 + P], wide_t.to(dev)[:, 5:]
    got = KINDS[kind](student, teacher, center.to(dev), 0.1, 0.04, G, "mean")
    (grad,) = torch.autograd.grad(got, leaf)
    s64 = wide_s.double().requires_grad_()
    want = dino64(s64[:, 3:3 + P], wide_t[:, 5:], center, 0.1, 0.04, G, "mean")
    (want_grad,) = torch.autograd.grad(want, s64)
    assert_close(got, want, torch.float32, name="loss")
    assert_close(grad, want_grad, torch.float32, atol=0.0, name="student grad")
