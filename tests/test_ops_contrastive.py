"""The fused Triton contrastive engine (sslkernels/ops/contrastive.py) against float64 math written here.

Every test checks the loss and the gradient of every differentiable input (features, temperatures,
scales, bias) on odd sizes (N = 1, 13, 37; D = 7, 33) with tiles of 16, so rows, keys and features
all span several tiles with ragged edges. Without a GPU the kernels run in Triton's interpreter on
CPU tensors (conftest sets TRITON_INTERPRET=1); with one, on CUDA tensors.
"""
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_CUDA, assert_close

import sslkernels
from sslkernels.backends import available
from sslkernels.ops import contrastive, launch_config

DEVICE = "cuda" if HAS_CUDA else "cpu"  # the Triton backend runs on CPU tensors only when interpreted
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
F64 = torch.float64


@pytest.fixture(autouse=True)
def _small_tiles(request):
    # 16 is tl.dot's minimum: the smallest tiles make small inputs take every multi-tile path.
    if "default_tiles" in request.node.name:
        yield
        return
    with launch_config.override(block_m=16, block_n=16, block_d=16, block_dout=16):
        yield


def _impl(op):
    return available(op)["triton"]


def _feats(n, d, dtype, scale=1.0):
    """(low-precision leaf on DEVICE, float64 leaf holding the same values)."""
    x = (torch.randn(n, d, dtype=F64) * scale).to(dtype)
    return x.to(DEVICE, copy=True).requires_grad_(), x.to(F64, copy=True).requires_grad_()


def _scalar(v, kind, n=None):
    """A temperature/scale as the op takes it: float, 0-d or 1-d fp32 tensor; plus its float64 twin."""
    if kind == "float":
        return v, torch.tensor(v, dtype=F64)
    t = torch.full((n,), v) * (0.5 + torch.rand(n)) if kind == "1d" else torch.tensor(v)
    return t.to(DEVICE, copy=True).requires_grad_(), t.to(F64, copy=True).requires_grad_()


def _reduce(rows, reduction):
    return rows.mean() if reduction == "mean" else rows.sum() if reduction == "sum" else rows


def _check(out, want, pairs, dtype):
    """Values, then gradients of every (low-precision input, float64 input) pair, for one random cotangent."""
    assert out.dtype == torch.float32, out.dtype  # losses come back in the compute dtype
    assert_close(out, want, dtype, name="loss")
    cot = torch.randn(want.shape, dtype=F64) if want.dim() else torch.tensor(1.7, dtype=F64)
    lo = [p[0] for p in pairs if isinstance(p[0], torch.Tensor)]
    hi = [p[1] for p in pairs if isinstance(p[0], torch.Tensor)]
    got = torch.autograd.grad(out, lo, cot.to(out.device, out.dtype))
    exp = torch.autograd.grad(want, hi, cot)
    for i, (g, e, x) in enumerate(zip(got, exp, lo)):
        assert g.dtype == x.dtype and g.shape == x.shape, (i, g.dtype, x.dtype)
        assert_close(g, e, dtype, name=f"grad[{i}]")


# ------------------------------------------------------------------- float64 definitions (the test's own)


def _ce_rows(logits, targets, decoupled):
    n = logits.shape[0]
    pos = logits[torch.arange(n), targets]
    if decoupled:
        logits = logits.clone()
        logits[torch.arange(n), targets] = float("-inf")
    return torch.logsumexp(logits, dim=1) - pos


def info_nce64(q, k, tau, targets, symmetric, decoupled):
    logits = (q @ k.T) / (tau[:, None] if tau.dim() == 1 else tau)
    t = torch.arange(q.shape[0]) if targets is None else targets
    rows = _ce_rows(logits, t, decoupled)
    if symmetric:
        rows = 0.5 * (rows + _ce_rows(logits.T, t, decoupled))
    return rows


def nt_xent64(z1, z2, tau, decoupled):
    z = torch.cat([z1, z2])
    n2 = z.shape[0]
    logits = (z @ z.T / tau).masked_fill(torch.eye(n2, dtype=torch.bool), float("-inf"))
    return _ce_rows(logits, (torch.arange(n2) + n2 // 2) % n2, decoupled)


def moco64(q, k, queue, tau):
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / tau
    return torch.logsumexp(logits, dim=1) - logits[:, 0]


def supcon64(f, labels, tau):
    """Per anchor, as in the paper: −(1/|P(i)|) Σ_p (S_ip − LSE_{a≠i} S_ia); 0 without positives."""
    logits = f @ f.T / tau
    rows = []
    for i in range(f.shape[0]):
        others = [a for a in range(f.shape[0]) if a != i]
        positives = [p for p in others if labels[p] == labels[i]]
        if not positives:
            rows.append((f[i] * 0).sum())
            continue
        lse = torch.logsumexp(logits[i, others], dim=0)
        rows.append(-(logits[i, positives] - lse).mean())
    return torch.stack(rows)


def siglip64(a, b, scale, bias):
    logits = scale * (a @ b.T) + bias
    labels = 2 * torch.eye(a.shape[0], dtype=F64) - 1
    return -F.logsigmoid(labels * logits).sum(dim=1)


# ---------------------------------------------------------------------------------------------- tests

# (N, M, D, targets given, symmetric, decoupled, temperature kind, reduction)
INFO_NCE_CASES = [
    (1, 1, 7, False, False, False, "float", "mean"),
    (1, 1, 7, False, True, False, "0d", "none"),
    (13, 13, 33, False, False, False, "1d", "none"),
    (13, 13, 33, False, True, True, "1d", "sum"),
    (37, 37, 7, False, True, False, "0d", "mean"),
    (37, 37, 7, False, False, True, "float", "none"),
    (13, 37, 33, True, False, False, "0d", "none"),
    (37, 5, 7, True, False, True, "1d", "mean"),
    (2, 19, 7, True, False, False, "float", "sum"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", INFO_NCE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_info_nce(case, dtype):
    n, m, d, with_targets, symmetric, decoupled, tau_kind, reduction = case
    q, q64 = _feats(n, d, dtype)
    k, k64 = _feats(m, d, dtype)
    tau, tau64 = _scalar(0.3, tau_kind, n)
    targets = torch.randint(0, m, (n,)) if with_targets else None
    out = _impl("info_nce")(q, k, tau, None if targets is None else targets.to(DEVICE), symmetric, decoupled,
                            reduction)
    want = _reduce(info_nce64(q64, k64, tau64, targets, symmetric, decoupled), reduction)
    _check(out, want, [(q, q64), (k, k64), (tau, tau64)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,scale_kind,reduction", [(1, 7, "0d", "mean"), (13, 33, "float", "none"),
                                                      (37, 7, "0d", "sum")])
def test_clip_loss(n, d, scale_kind, reduction, dtype):
    a, a64 = _feats(n, d, dtype)
    b, b64 = _feats(n, d, dtype)
    scale, scale64 = _scalar(4.0, scale_kind)
    out = _impl("clip_loss")(a, b, scale, reduction)
    want = _reduce(info_nce64(a64, b64, 1 / scale64, None, True, False), reduction)
    _check(out, want, [(a, a64), (b, b64), (scale, scale64)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,decoupled,tau_kind,reduction", [(1, 7, False, "0d", "none"), (13, 33, True, "float", "mean"),
                                                              (37, 7, False, "0d", "mean"), (2, 33, True, "0d", "none")])
def test_nt_xent(n, d, decoupled, tau_kind, reduction, dtype):
    z1, z164 = _feats(n, d, dtype)
    z2, z264 = _feats(n, d, dtype)
    tau, tau64 = _scalar(0.5, tau_kind)
    out = _impl("nt_xent")(z1, z2, tau, decoupled, reduction)
    want = _reduce(nt_xent64(z164, z264, tau64, decoupled), reduction)
    _check(out, want, [(z1, z164), (z2, z264), (tau, tau64)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,d,key_grad,reduction", [(1, 5, 7, True, "none"), (13, 37, 33, True, "mean"),
                                                      (37, 1, 7, False, "sum")])
def test_moco_loss(n, k, d, key_grad, reduction, dtype):
    q, q64 = _feats(n, d, dtype)
    key, key64 = _feats(n, d, dtype)
    key.requires_grad_(key_grad)
    key64.requires_grad_(key_grad)
    queue, queue64 = _feats(k, d, dtype)
    queue.requires_grad_(False)
    tau, tau64 = _scalar(0.2, "0d")
    out = _impl("moco_loss")(q, key, queue, tau, reduction)
    want = _reduce(moco64(q64, key64, queue64.detach(), tau64), reduction)
    pairs = [(q, q64), (tau, tau64)] + ([(key, key64)] if key_grad else [])
    _check(out, want, pairs, dtype)
    if not key_grad:
        assert not key.requires_grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,n_classes,reduction", [(13, 33, 4, "mean"), (37, 7, 25, "none"), (37, 7, 60, "mean"),
                                                     (13, 33, 6, "sum")])
def test_supcon_loss(n, d, n_classes, reduction, dtype):
    f, f64 = _feats(n, d, dtype)
    labels = torch.randint(0, n_classes, (n,))  # many classes: several anchors without a positive
    tau, tau64 = _scalar(0.1, "0d")
    out = _impl("supcon_loss")(f, labels.to(DEVICE), tau, reduction)
    rows = supcon64(f64, labels, tau64)
    has_pos = torch.tensor([(labels == labels[i]).sum() > 1 for i in range(n)])
    want = rows.sum() / has_pos.sum().clamp(min=1) if reduction == "mean" else _reduce(rows, reduction)
    _check(out, want, [(f, f64), (tau, tau64)], dtype)


def test_supcon_lone_anchor_is_zero_with_zero_grad():
    f = torch.randn(1, 7, device=DEVICE, requires_grad=True)
    out = _impl("supcon_loss")(f, torch.zeros(1, dtype=torch.long, device=DEVICE), 0.1, "mean")
    out.backward()
    assert out.item() == 0.0 and torch.equal(f.grad, torch.zeros_like(f))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,kind,reduction", [(1, 7, "0d", "none"), (13, 33, "float", "mean"), (37, 7, "0d", "sum")])
def test_siglip_loss(n, d, kind, reduction, dtype):
    a, a64 = _feats(n, d, dtype, scale=0.3)
    b, b64 = _feats(n, d, dtype, scale=0.3)
    scale, scale64 = _scalar(5.0, kind)
    bias, bias64 = _scalar(-3.0, kind)
    out = _impl("siglip_loss")(a, b, scale, bias, reduction)
    want = _reduce(siglip64(a64, b64, scale64, bias64), reduction)
    _check(out, want, [(a, a64), (b, b64), (scale, scale64), (bias, bias64)], dtype)


def test_large_logits_stay_finite():
    # |logits| up to ~3000: the online max keeps exp2 in range; the excluded diagonal is the largest.
    z1, z164 = _feats(13, 7, torch.float32, scale=20.0)
    z2, z264 = _feats(13, 7, torch.float32, scale=20.0)
    out = _impl("nt_xent")(z1, z2, 0.5, False, "none")
    want = nt_xent64(z164, z264, torch.tensor(0.5, dtype=F64), False)
    _check(out, want, [(z1, z164), (z2, z264)], torch.float32)


def test_float64_inputs_take_the_exact_path():
    q, q64 = _feats(13, 7, F64)
    k, k64 = _feats(13, 7, F64)
    out = _impl("info_nce")(q, k, 0.2, None, True, False, "none")
    want = info_nce64(q64, k64, torch.tensor(0.2, dtype=F64), None, True, False)
    assert out.dtype == F64
    _check_f64 = torch.autograd.grad(out.sum(), [q, k])
    exp = torch.autograd.grad(want.sum(), [q64, k64])
    assert_close(out, want, F64)
    for g, e in zip(_check_f64, exp):
        assert_close(g, e, F64)


@pytest.mark.skipif(HAS_CUDA, reason="interpreter-only path: on a GPU bf16 runs natively (covered by DTYPES)")
def test_bf16_under_the_interpreter_is_upcast():
    q, q64 = _feats(13, 33, torch.bfloat16)
    k, k64 = _feats(13, 33, torch.bfloat16)
    out = _impl("info_nce")(q, k, 0.3, None, False, False, "none")
    want = info_nce64(q64, k64, torch.tensor(0.3, dtype=F64), None, False, False)
    _check(out, want, [(q, q64), (k, k64)], torch.bfloat16)


def test_public_api_reaches_the_triton_impl():
    q, q64 = _feats(13, 7, torch.float32)
    k, k64 = _feats(13, 7, torch.float32)
    out = sslkernels.functional.info_nce(q, k, 0.1, symmetric=True, backend="triton")
    want = info_nce64(q64, k64, torch.tensor(0.1, dtype=F64), None, True, False).mean()
    _check(out, want, [(q, q64), (k, k64)], torch.float32)


def test_no_n_by_m_tensor_exists(monkeypatch):
    """Neither the autograd graph nor any host-side op of forward + backward holds an N×M-sized tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode

    # No key split here (on a GPU these 64 rows would split): its fp32 partials [splits, N, D] are bounded
    # by the device size (splits·N ≤ SMs·BLOCK_M rows), not by N·M; test_key_split covers that path.
    monkeypatch.setattr(contrastive, "_SPLIT_PROGRAMS", 1)

    n, d = 64, 8  # N·M = 4096 elements, the inputs 512 each
    biggest = {"saved": 0, "op": 0}

    def in_interpreter():
        # Triton's interpreter stages kernel arguments through host buffers: not the code under test.
        f = sys._getframe()
        while f is not None:
            if "triton" in f.f_code.co_filename and "interpreter" in f.f_code.co_filename:
                return True
            f = f.f_back
        return False

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not in_interpreter():
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor):
                        biggest["op"] = max(biggest["op"], t.numel())
            return out

    def pack(t):
        biggest["saved"] = max(biggest["saved"], t.numel())
        return t

    calls = [
        lambda a, b, t: _impl("info_nce")(a, b, t, None, True, True, "none"),
        lambda a, b, t: _impl("nt_xent")(a, b, t, True, "mean"),
        lambda a, b, t: _impl("moco_loss")(a, b, b.detach() * 2, t, "mean"),
        lambda a, b, t: _impl("supcon_loss")(a, torch.arange(n, device=DEVICE) % 5, t, "mean"),
        lambda a, b, t: _impl("siglip_loss")(a, b, t, t, "sum"),
    ]
    for call in calls:
        a = torch.randn(n, d, device=DEVICE, requires_grad=True)
        b = torch.randn(n, d, device=DEVICE, requires_grad=True)
        t = torch.tensor(0.5, device=DEVICE, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), Record():
            loss = call(a, b, t)
            loss.sum().backward()
        assert a.grad is not None and t.grad is not None
    assert biggest["saved"] <= 2 * n * d, biggest
    assert biggest["op"] <= 2 * n * d, biggest


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA: the default (large) tiles on inputs that span several")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_default_tiles_gpu(dtype):
    n, m, d = 301, 333, 300  # D > 256: the backward splits features over programs
    q, q64 = _feats(n, d, dtype, scale=0.1)
    k, k64 = _feats(m, d, dtype, scale=0.1)
    tau, tau64 = _scalar(0.1, "1d", n)
    targets = torch.randint(0, m, (n,))
    out = _impl("info_nce")(q, k, tau, targets.to(DEVICE), False, True, "none")
    want = info_nce64(q64, k64, tau64, targets, False, True)
    _check(out, want, [(q, q64), (k, k64), (tau, tau64)], dtype)
    a, a64 = _feats(n, d, dtype, scale=0.1)
    b, b64 = _feats(n, d, dtype, scale=0.1)
    scale, scale64 = _scalar(10.0, "0d")
    out = _impl("clip_loss")(a, b, scale, "none")
    want = info_nce64(a64, b64, 1 / scale64, None, True, False)
    _check(out, want, [(a, a64), (b, b64), (scale, scale64)], dtype)


def test_contrastive_module_registers_every_op():
    for op in ("info_nce", "clip_loss", "nt_xent", "moco_loss", "supcon_loss", "siglip_loss"):
        assert available(op)["triton"].__module__ == contrastive.__name__


@pytest.mark.parametrize("which", ["key", "scale"])
def test_partial_requires_grad(which):
    # Only some inputs require a gradient: the backward skips the passes nobody needs.
    a, a64 = _feats(13, 33, torch.float32)
    b, b64 = _feats(13, 33, torch.float32)
    a.requires_grad_(False)
    a64.requires_grad_(False)
    if which == "scale":
        b.requires_grad_(False)
        b64.requires_grad_(False)
    scale, scale64 = _scalar(3.0, "0d")
    out = _impl("clip_loss")(a, b, scale, "none")
    want = info_nce64(a64, b64, 1 / scale64, None, True, False)
    _check(out, want, [(scale, scale64)] + ([(b, b64)] if which == "key" else []), torch.float32)


# ------------------------------------------------------------------------ engine variants (v1 / v2 paths)
# The tests above run the default engine (v2: fixed shift with its device-side repair, self-similarity
# triangle, one-exp backward). Below: every other path the GPU session compares, on a few cases each.

ENGINES = {
    "v1": dict(version="v1"),
    "v2-online": dict(version="v2", shift="online"),
    "v2-fixed-plain": dict(version="v2", shift="fixed", self_reuse=False, one_exp_bwd=False),
}
TILES = {"chunked": dict(block_d=16, block_dout=16), "resident": dict(block_d=0, block_dout=0)}


def _unit(n, d, dtype):
    x = F.normalize(torch.randn(n, d, dtype=F64), dim=1).to(dtype)
    return x.to(DEVICE, copy=True).requires_grad_(), x.to(F64, copy=True).requires_grad_()


def _run_case(op, dtype, feats=_feats):
    """One small case of ``op`` against float64 (loss and every gradient)."""
    if op == "info_nce":
        q, q64 = feats(13, 33, dtype)
        k, k64 = feats(13, 33, dtype)
        tau, tau64 = _scalar(0.3, "1d", 13)
        out = _impl("info_nce")(q, k, tau, None, True, True, "none")
        _check(out, info_nce64(q64, k64, tau64, None, True, True), [(q, q64), (k, k64), (tau, tau64)], dtype)
    elif op == "clip_loss":
        a, a64 = feats(37, 7, dtype)
        b, b64 = feats(37, 7, dtype)
        sc, sc64 = _scalar(4.0, "0d")
        out = _impl("clip_loss")(a, b, sc, "sum")
        want = info_nce64(a64, b64, 1 / sc64, None, True, False).sum()
        _check(out, want, [(a, a64), (b, b64), (sc, sc64)], dtype)
    elif op == "nt_xent":
        z1, z164 = feats(19, 7, dtype)
        z2, z264 = feats(19, 7, dtype)
        tau, tau64 = _scalar(0.5, "0d")
        out = _impl("nt_xent")(z1, z2, tau, True, "none")
        _check(out, nt_xent64(z164, z264, tau64, True), [(z1, z164), (z2, z264), (tau, tau64)], dtype)
    elif op == "supcon_loss":
        f, f64 = feats(37, 33, dtype)
        labels = torch.randint(0, 8, (37,))
        tau, tau64 = _scalar(0.2, "0d")
        out = _impl("supcon_loss")(f, labels.to(DEVICE), tau, "none")
        _check(out, supcon64(f64, labels, tau64), [(f, f64), (tau, tau64)], dtype)
    else:
        q, q64 = feats(13, 33, dtype)
        key, key64 = feats(13, 33, dtype)
        queue, queue64 = feats(37, 33, dtype)
        queue.requires_grad_(False)
        tau, tau64 = _scalar(0.2, "0d")
        out = _impl("moco_loss")(q, key, queue, tau, "none")
        _check(out, moco64(q64, key64, queue64.detach(), tau64), [(q, q64), (key, key64), (tau, tau64)], dtype)


# v1 never keeps a tile resident; the plain fixed-shift engine differs from the default only in its
# self-similarity and backward choices, which do not depend on the tiling.
VARIANTS = [("v1", "chunked"), ("v2-online", "chunked"), ("v2-online", "resident"), ("v2-fixed-plain", "resident")]


@pytest.mark.parametrize("engine,tiles", VARIANTS, ids=lambda v: v)
@pytest.mark.parametrize("op", ["info_nce", "nt_xent", "supcon_loss", "moco_loss"])
def test_engine_variants(op, engine, tiles):
    with launch_config.use_engine(**ENGINES[engine]), launch_config.override(**TILES[tiles]):
        _run_case(op, torch.float32)


def test_moco_fixed_shift_bounds_the_positive_key_too():
    # The fixed shift must bound the positive logit s·q_i·k_i as well as the queue's: with keys 60× the queue's
    # norm, a shift from the queue alone leaves exp2(z − shift) ≈ 2^400 for the positive (inf in fp32).
    q, q64 = _unit(13, 33, torch.float32)
    key, key64 = _feats(13, 33, torch.float32)
    with torch.no_grad():
        key.mul_(60.0 / key.norm(dim=1, keepdim=True))
        key64.mul_(60.0 / key64.norm(dim=1, keepdim=True))
    queue, queue64 = _unit(37, 33, torch.float32)
    tau, tau64 = _scalar(0.2, "0d")
    with launch_config.use_engine(**ENGINES_ALL["v2-fixed"]):
        out = _impl("moco_loss")(q, key, queue.detach(), tau, "none")
    _check(out, moco64(q64, key64, queue64.detach(), tau64), [(q, q64), (key, key64), (tau, tau64)], torch.float32)


def test_siglip_loss_terms_around_the_series_switch():
    # log(1 + t), t = e^−|x|, switches to its series below t = 0.01, where the series' error t⁴/4 is < 3e-9; a
    # switch too far out (t = 0.1) would leave 2e-5 per term. Rows at t from 0.2 to 0.005, 16 terms each.
    n = 16
    alpha = -torch.linspace(1.6, 5.3, n, dtype=F64)
    a64 = torch.zeros(n, 4, dtype=F64)
    a64[:, 0] = alpha
    b64 = torch.zeros(n, 4, dtype=F64)
    b64[:, 0] = 1.0
    a64, b64 = a64.float().double(), b64.float().double()
    a, b = (x.float().to(DEVICE).requires_grad_() for x in (a64, b64))
    a64.requires_grad_(), b64.requires_grad_()
    out = _impl("siglip_loss")(a, b, 1.0, 0.0, "none")
    want = siglip64(a64, b64, torch.tensor(1.0, dtype=F64), torch.tensor(0.0, dtype=F64))
    assert_close(out, want, torch.float32, atol=0.0, rtol=1e-5, name="SigLIP rows near the series switch")
    _check(out, want, [(a, a64), (b, b64)], torch.float32)


def test_fp16_clip_at_the_largest_logit_scale():
    # CLIP clamps logit_scale at 100: the columns pass multiplies dS by s before its fp16 cast, so the fp16 scale
    # must bound |dS|·s (2^12·100 would overflow fp16's 65504 if it bounded |dS| alone).
    a, a64 = _unit(37, 33, torch.float16)
    b, b64 = _unit(37, 33, torch.float16)
    sc, sc64 = _scalar(100.0, "0d")
    out = _impl("clip_loss")(a, b, sc, "mean")
    want = info_nce64(a64, b64, 1 / sc64, None, True, False).mean()
    _check(out, want, [(a, a64), (b, b64), (sc, sc64)], torch.float16)


def test_siglip_loss_of_tiny_terms_keeps_its_digits():
    # Every pair far on its right side: log(1 + e^−x) ≈ 4e-9 per term; computed as log(1 + t) it rounded to 0.
    a = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], device=DEVICE)
    got = _impl("siglip_loss")(a, a, 20.0, 0.0, "none")
    want = 2 * torch.log1p(torch.exp(torch.tensor(-20.0, dtype=F64))) / 1  # two terms per row, summed
    assert_close(got, want.expand(2), torch.float32, atol=0.0, rtol=1e-5, name="tiny SigLIP terms")


@pytest.mark.parametrize("engine", ["v2-online", "v2-fixed"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["rows", "two-sided"])
def test_fp16_gradients_keep_the_negatives_at_a_large_batchs_upstream(symmetric, engine):
    # A mean over N = 32768 rows hands each row g = 2^-15; times P ≈ 1/M over 4096 keys, dS lies at fp16's
    # smallest subnormals and below: cast as it is, the negatives' part of the gradient would vanish (the
    # audit: 22% error at N = M = 32768). The fp16 passes scale dS before the cast and unscale the fp32 sums.
    n, m = (8, 4096) if not symmetric else (256, 256)
    q, q64 = _unit(n, 32, torch.float16)
    k, k64 = _unit(m, 32, torch.float16)
    targets = None if symmetric else torch.randint(0, m, (n,))
    tau = torch.tensor(0.1, dtype=F64)
    with launch_config.use_engine(**ENGINES_ALL[engine]):
        out = _impl("info_nce")(q, k, 0.1, None if targets is None else targets.to(DEVICE), symmetric, False, "none")
        want = info_nce64(q64, k64, tau, targets, symmetric, False)
        cot = 2.0 ** -15 * (0.5 + torch.rand(want.shape, dtype=F64)) * (1 if not symmetric else 2.0 ** -3)
        got = torch.autograd.grad(out, [q, k], cot.to(out.dtype).to(DEVICE))
    wants = torch.autograd.grad(want, [q64, k64], cot)
    for g, w, name in zip(got, wants, ("query", "key")):
        # relative to the gradient's own scale (atol 0): it is ~1e-4 here, well inside fp16's normal range
        assert_close(g, w, torch.float16, atol=0.0, rtol=1e-2, name=f"{name} grad (scale {float(w.abs().max()):.1e})")


@pytest.mark.parametrize("engine", ["v1", "v2-online", "v2-fixed"])
@pytest.mark.parametrize("split", [False, True], ids=["whole", "key-split"])
def test_a_nan_in_one_key_makes_every_loss_nan(engine, split, monkeypatch):
    # NaN never passes: the online path's running max skips a NaN logit, and max(l, 1) must not turn the NaN
    # sum back into a finite, wrong LSE (supcon_loss takes the online path always, moco with its key split).
    if split:
        monkeypatch.setattr(contrastive, "_SPLIT_PROGRAMS", 64)
    q, k = _unit(8, 33, torch.float32)[0], _unit(8, 33, torch.float32)[0]
    queue, f = _unit(150, 33, torch.float32)[0].detach(), _unit(37, 33, torch.float32)[0].detach()
    with torch.no_grad():
        k[5, 3] = queue[123, 4] = f[9, 0] = float("nan")
    labels = torch.randint(0, 4, (37,)).to(DEVICE)
    labels[9] = 99  # the NaN row alone in its class: only the denominators see it
    with launch_config.use_engine(**ENGINES_ALL[engine]), launch_config.override(block_n=16):
        losses = {"info_nce": _impl("info_nce")(q, k, 0.1, None, False, False, "none"),
                  "moco_loss": _impl("moco_loss")(q, k.detach()[[0, 1, 2, 3, 4, 6, 7, 0]], queue, 0.2, "none"),
                  "supcon_loss": _impl("supcon_loss")(f, labels, 0.1, "none")}
    for op, rows in losses.items():
        valid = rows if op != "supcon_loss" else rows[torch.arange(37, device=DEVICE) != 9]
        assert valid.isnan().all(), f"{op}: {rows.tolist()}"


def _check_query_of_norm_4e20(k64, targets, symmetric, engine):
    """InfoNCE with query row 2 of norm ~4e20 (its fp32 sum of squares overflows) against the keys ``k64``; loss
    and gradients against float64, each gradient relative to its own scale (dq ~1e-20, dk ~1e20)."""
    q64 = torch.randn(6, 9, dtype=F64)
    q64[2] *= 1e20
    q, k = (x.float().to(DEVICE).requires_grad_() for x in (q64, k64))
    q64.requires_grad_(), k64.requires_grad_()
    with launch_config.use_engine(**ENGINES_ALL[engine]):
        out = _impl("info_nce")(q, k, 0.5, None if targets is None else targets.to(DEVICE), symmetric, False, "none")
    want = info_nce64(q64, k64, torch.tensor(0.5, dtype=F64), targets, symmetric, False)
    assert_close(out, want, torch.float32, name="loss")
    cot = torch.rand(want.shape, dtype=F64)
    got = torch.autograd.grad(out, [q, k], cot.float().to(DEVICE))
    exp = torch.autograd.grad(want, [q64, k64], cot)
    for g, e, name in zip(got, exp, ("query", "key")):
        assert_close(g, e, torch.float32, atol=0.0, rtol=1e-4, name=name)


@pytest.mark.parametrize("engine", ["v2-online", "v2-fixed"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["rows", "two-sided"])
def test_a_query_of_norm_past_fp32s_square_root_range(symmetric, engine):
    # The fixed shift's norm bound was inf and then inf − inf = NaN for every row, although every logit (keys
    # of norm ~1e-20) is small and finite.
    _check_query_of_norm_4e20(torch.randn(6, 9, dtype=F64) * 1e-20, None, symmetric, engine)


def test_a_query_of_norm_past_fp32s_square_root_range_against_all_zero_keys():
    # The query's bound overflows to inf and the keys' bound is 0: the kernel's own clamp to FLT_MAX must keep the
    # shift 0, not inf·0 = NaN (the host's clamp after the product cannot turn a NaN back). Every logit is 0.
    _check_query_of_norm_4e20(torch.zeros(5, 9, dtype=F64), torch.zeros(6, dtype=torch.long), False, "v2-fixed")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["info_nce", "clip_loss", "nt_xent", "supcon_loss", "moco_loss"])
def test_fixed_shift_alone_on_normalized_inputs(op, dtype, monkeypatch):
    # With L2-normalized inputs every row sum lies in the trusted range: the fixed-shift pass alone
    # (no repair) must give the loss and every gradient, resident tiles and the one-exp backward included.
    monkeypatch.setattr(contrastive, "_REPAIR", False)
    with launch_config.override(block_d=0, block_dout=0):
        _run_case(op, dtype, feats=_unit)


@pytest.mark.parametrize("op,scale", [("info_nce", 0.01), ("clip_loss", 100.0), ("nt_xent", 0.01)])
def test_fixed_shift_extreme_scales_on_normalized_inputs(op, scale):
    # τ = 0.01 / logit_scale = 100: |logits| ≤ 100; the shift is 100·log2(e), still no repair needed here.
    q, q64 = _unit(13, 33, torch.float32)
    k, k64 = _unit(13, 33, torch.float32)
    if op == "info_nce":
        tau, tau64 = _scalar(scale, "1d", 13)
        out = _impl(op)(q, k, tau, None, True, False, "none")
        want = info_nce64(q64, k64, tau64, None, True, False)
    elif op == "clip_loss":
        tau, tau64 = _scalar(scale, "0d")
        out = _impl(op)(q, k, tau, "none")
        want = info_nce64(q64, k64, 1 / tau64, None, True, False)
    else:
        tau, tau64 = _scalar(scale, "0d")
        out = _impl(op)(q, k, tau, False, "none")
        want = nt_xent64(q64, k64, tau64, False)
    _check(out, want, [(q, q64), (k, k64), (tau, tau64)], torch.float32)


def test_fixed_shift_flags_and_fallbacks():
    # Normalized inputs: no row needs the repair pass and the one-exp backward is allowed (flag 0).
    # Large unnormalized ones: rows fall far below the bound, the device-side repair and the guarded
    # two-exp backward take over, and the loss and gradients are still right.
    mode = contrastive._Mode(contrastive.POS_TARGET, two_sided=True)
    for feats, flagged in ((_unit, False), (lambda n, d, dt: _feats(n, d, dt, scale=6.0), True)):
        q, q64 = feats(37, 7, torch.float32)
        k, k64 = feats(37, 7, torch.float32)
        s = torch.full((1,), 1 / 0.2, device=DEVICE)
        t = torch.arange(37, device=DEVICE)
        with torch.no_grad():
            shift = contrastive._shift(q, k, None, s)
            val, _, _, c_lse = contrastive._forward_stats(mode, q.detach(), k.detach(), None, s, None, t, None)
            low = (val - shift < torch.log2(torch.tensor(37.0)) - 106).any()
            g = torch.ones(37, device=DEVICE)
            flag = contrastive._one_exp_factors(val, g, c_lse, g)[1]
        assert bool(low) == flagged and bool(flag.item()) == flagged
        out = _impl("info_nce")(q, k, 0.2, None, True, False, "none")
        want = info_nce64(q64, k64, torch.tensor(0.2, dtype=F64), None, True, False)
        _check(out, want, [(q, q64), (k, k64)], torch.float32)


def test_guarded_fallback_under_a_key_split(monkeypatch):
    # A two-sided block of keys (the block engine: m > n, so the rows backward may split the keys) whose row LSEs
    # lie ~300 (base 2) apart: the device flag hands the rows pass to the two-exp fallback, which reuses the split
    # buffers of the one-exp launch with its own key ranges (cdiv(m, splits) = 50 here, not a whole number of
    # 16-key tiles). Its dA and ∂s must equal one plain unsplit pass.
    mode = contrastive._Mode(contrastive.POS_TARGET, two_sided=True)
    a = F.normalize(torch.randn(3, 24), dim=1).to(DEVICE)
    b = F.normalize(torch.randn(150, 24), dim=1).to(DEVICE)
    s = torch.tensor([400.0, 1.0, 1.0], device=DEVICE)
    t = torch.arange(3, device=DEVICE)
    with launch_config.override(block_m=16, block_n=16, block_d=16, block_dout=16), torch.no_grad():
        val, pos, _, c_lse = contrastive._forward_stats(mode, a, b, None, s, None, t, None)
        g, gc = torch.rand(3, device=DEVICE) + 0.5, torch.rand(150, device=DEVICE) + 0.5
        st = contrastive._BwdStats(val, g, g, c_lse, gc, gc, pos)
        want = contrastive._combine_bwd_rows(*contrastive._launch_bwd_rows(
            mode, a, b, None, s, None, t, None, st, False, version="v2"), torch.float32)
        shift, flag, fr, fc = contrastive._one_exp_factors(val, g, c_lse, gc)
        assert flag.item() == 1, "the LSEs no longer lie far apart: this test checks nothing"
        monkeypatch.setattr(contrastive, "_SPLIT_PROGRAMS", 64)
        seen = []
        real = contrastive._key_split
        monkeypatch.setattr(contrastive, "_key_split", lambda *args: seen.append(real(*args)) or seen[-1])
        got = contrastive._combine_bwd_rows(*contrastive._guarded(
            contrastive._launch_bwd_rows, (shift, flag, st._replace(gr=fr, gc=fc)), "v2", mode, a, b, None, s, None,
            t, None, st, False), torch.float32)
    assert seen and seen[-1][0] > 1 and contrastive.cdiv(150, seen[-1][0]) % 16, seen  # split, off tile edges
    assert_close(got[0], want[0], torch.float32, name="dA")
    assert_close(got[2], want[2], torch.float32, name="per-row ds")


@pytest.mark.parametrize("op", ["info_nce", "clip_loss", "nt_xent"])
def test_deterministic_algorithms_take_the_atomic_free_kernels(op, monkeypatch):
    # Float atomics add in a varying order (GPU): by default the two-sided losses' column sums and NT-Xent's
    # self-similarity pass use them; under torch.use_deterministic_algorithms(True) those losses take the
    # online kernels (each sum made by one program), with the same loss and gradients.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS asks of a CUDA run
    seen = []
    fwd, self_fwd = contrastive._launch_fwd, contrastive._launch_self_fwd
    monkeypatch.setattr(contrastive, "_launch_fwd",
                        lambda mode, *a, **k: seen.append(k.get("fixed", False) and mode.two_sided and
                                                          not k.get("columns")) or fwd(mode, *a, **k))
    monkeypatch.setattr(contrastive, "_launch_self_fwd", lambda *a, **k: seen.append(True) or self_fwd(*a, **k))
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    with launch_config.override(block_d=0, block_dout=0):
        _run_case(op, torch.float32, feats=_unit)  # info_nce's case is symmetric
        assert any(seen), "the default forward no longer adds atomically: this test checks nothing"
        seen.clear()
        torch.use_deterministic_algorithms(True)
        try:
            _run_case(op, torch.float32, feats=_unit)
            assert seen and not any(seen)
            # A one-sided loss sums each row in one program already: it keeps the fixed-shift kernels.
            seen.clear()
            q, _ = _unit(13, 33, torch.float32)
            with torch.no_grad():
                mode = contrastive._Mode(contrastive.POS_TARGET)
                monkeypatch.setattr(contrastive, "_launch_fwd", lambda *a, **k: seen.append(k.get("fixed")) or
                                    fwd(*a, **k))
                contrastive._forward_stats(mode, q, q, None, torch.full((1,), 5.0, device=DEVICE), None,
                                           torch.arange(13, device=DEVICE), None)
            assert seen and seen[0] is True
        finally:
            torch.use_deterministic_algorithms(was, warn_only=warn_only)


def test_engine_settings_and_default_tiles_table(monkeypatch):
    monkeypatch.setenv("SSLKERNELS_CONTRASTIVE_ENGINE", "v1")
    monkeypatch.setenv("SSLKERNELS_CONTRASTIVE_SELF_REUSE", "0")
    assert launch_config.engine().version == "v1" and not launch_config.engine().self_reuse
    with launch_config.use_engine(version="v2", shift="online"):
        assert launch_config.engine() == launch_config.Engine("v2", "online", False, True)
    monkeypatch.setenv("SSLKERNELS_CONTRASTIVE_ONE_EXP_BWD", "0")
    assert not launch_config.engine().one_exp_bwd and launch_config.engine().self_reuse is False
    monkeypatch.setenv("SSLKERNELS_CONTRASTIVE_SHIFT", "bogus")
    with pytest.raises(ValueError, match="shift"):
        launch_config.engine()
    # The table: v2 keeps D ≤ 256 (half) resident, larger D chunks like v1.
    assert launch_config.is_resident(launch_config.get("bwd_rows", torch.bfloat16, 256, "v2"), 256)
    assert not launch_config.is_resident(launch_config.get("bwd_rows", torch.bfloat16, 512, "v2"), 512)
    assert not launch_config.is_resident(launch_config.get("fwd", torch.bfloat16, 256, "v1"), 256)


# ---------------------------------------------------------------------------------------- key split

ENGINES_ALL = {**ENGINES, "v2-fixed": dict(version="v2", shift="fixed")}


@pytest.mark.parametrize("engine", ["v1", "v2-online", "v2-fixed"])
@pytest.mark.parametrize("op", ["info_nce", "clip_loss", "nt_xent", "supcon_loss", "moco_loss", "siglip_loss"])
def test_key_split(op, engine, monkeypatch):
    # Few rows, many keys: the forward and the rows backward split the keys over programs (MoCo's 256
    # queries × 65536 queue keys on a GPU) and combine partial LSEs / sums / dA on the host. The split is
    # forced here (64 programs wanted) with 150 keys = 10 key tiles of 16; a spy checks it happened.
    monkeypatch.setattr(contrastive, "_SPLIT_PROGRAMS", 64)
    seen = []
    real = contrastive._key_split
    monkeypatch.setattr(contrastive, "_key_split", lambda *a: seen.append(real(*a)) or seen[-1])
    dt = torch.float32
    with launch_config.use_engine(**ENGINES_ALL[engine]):
        if op == "info_nce":
            q, q64 = _feats(5, 33, dt)
            k, k64 = _feats(150, 33, dt)
            tau, tau64 = _scalar(0.3, "1d", 5)
            targets = torch.randint(0, 150, (5,))
            out = _impl("info_nce")(q, k, tau, targets.to(DEVICE), False, True, "none")
            _check(out, info_nce64(q64, k64, tau64, targets, False, True), [(q, q64), (k, k64), (tau, tau64)], dt)
        elif op == "clip_loss":
            a, a64 = _feats(150, 7, dt)
            b, b64 = _feats(150, 7, dt)
            sc, sc64 = _scalar(4.0, "0d")
            out = _impl("clip_loss")(a, b, sc, "none")
            _check(out, info_nce64(a64, b64, 1 / sc64, None, True, False), [(a, a64), (b, b64), (sc, sc64)], dt)
        elif op == "nt_xent":
            z1, z164 = _feats(75, 7, dt)
            z2, z264 = _feats(75, 7, dt)
            tau, tau64 = _scalar(0.5, "0d")
            out = _impl("nt_xent")(z1, z2, tau, False, "none")
            _check(out, nt_xent64(z164, z264, tau64, False), [(z1, z164), (z2, z264), (tau, tau64)], dt)
        elif op == "supcon_loss":
            f, f64 = _feats(150, 7, dt)
            labels = torch.randint(0, 20, (150,))
            tau, tau64 = _scalar(0.2, "0d")
            out = _impl("supcon_loss")(f, labels.to(DEVICE), tau, "none")
            _check(out, supcon64(f64, labels, tau64), [(f, f64), (tau, tau64)], dt)
        elif op == "siglip_loss":
            a, a64 = _feats(150, 7, dt, scale=0.3)
            b, b64 = _feats(150, 7, dt, scale=0.3)
            sc, sc64 = _scalar(5.0, "0d")
            bias, bias64 = _scalar(-3.0, "0d")
            out = _impl("siglip_loss")(a, b, sc, bias, "none")
            _check(out, siglip64(a64, b64, sc64, bias64), [(a, a64), (b, b64), (sc, sc64), (bias, bias64)], dt)
        else:
            q, q64 = _feats(13, 33, dt)
            key, key64 = _feats(13, 33, dt)
            queue, queue64 = _feats(150, 33, dt)
            queue.requires_grad_(False)
            tau, tau64 = _scalar(0.2, "0d")
            out = _impl("moco_loss")(q, key, queue, tau, "none")
            _check(out, moco64(q64, key64, queue64.detach(), tau64), [(q, q64), (key, key64), (tau, tau64)], dt)
    if not (op == "nt_xent" and engine == "v2-fixed"):  # its forward walks the triangle; N = M caps the backward
        assert any(sp > 1 for sp, _ in seen), seen


def test_key_split_sizes():
    # Splits cover the keys exactly, in whole key tiles, and vanish when the rows already fill the device.
    for programs, m, bn, target in [(4, 65536, 64, 132), (1, 100, 16, 8), (3, 150, 16, 64), (300, 65536, 64, 132)]:
        old = contrastive._SPLIT_PROGRAMS
        contrastive._SPLIT_PROGRAMS = target
        try:
            splits, per = contrastive._key_split(programs, m, bn, torch.device("cpu"))
        finally:
            contrastive._SPLIT_PROGRAMS = old
        assert splits >= 1 and (splits - 1) * per < m <= splits * per
        assert splits == 1 or per % bn == 0
        assert splits * programs <= max(target * contrastive._UNDERFILLED_WAVES, programs)
    assert contrastive._key_split(4, 65536, 64, torch.device("cpu")) == (1, 65536)  # interpreter: no split
    old = contrastive._SPLIT_PROGRAMS
    contrastive._SPLIT_PROGRAMS = 132
    try:  # the backward's memory cap wins over the device's wish
        assert contrastive._key_split(4, 65536, 64, torch.device("cpu"), 3)[0] == 3
        assert contrastive._key_split(4, 65536, 64, torch.device("cpu"), 0)[0] == 1
        # MoCo v2's 4 row tiles on 132 SMs: ~4 programs per SM (128 splits of 512 keys), not one (32 of
        # 2048); 128 row tiles (N = 16384) nearly fill the device once: no split.
        assert contrastive._key_split(4, 65536, 64, torch.device("cpu")) == (128, 512)
        assert contrastive._key_split(128, 16384, 32, torch.device("cpu"))[0] == 1
        assert contrastive._key_split(33, 4096, 32, torch.device("cpu"))[0] == 4 * 132 // 33
    finally:
        contrastive._SPLIT_PROGRAMS = old
