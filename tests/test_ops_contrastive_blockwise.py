"""The block engine (sslkernels/ops/contrastive_blockwise.py) on one process: its Triton path (Triton's
interpreter on CPU tensors, CUDA tensors with a GPU) and its torch path against float64 math written here.

Odd sizes (N = 5 anchors, M = 7 keys, D = 24: no multiple of any tile) and anchors that sit at a global
offset among the keys (row_base), met at once or in blocks of 3 keys ([0, 3), [3, 6), [6, 7)), so targets
fall outside most blocks, the excluded own column and SigLIP's positive pair move from block to block, and
one block holds a single key. Values and the gradient of every input: features, keys, the logit scale
(scalar or per anchor) and SigLIP's bias. fp32 and fp16; bf16 on a GPU only (the interpreter's tl.dot is
wrong on bf16).
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_CUDA, assert_close

from sslkernels.ops import contrastive, contrastive_blockwise as bw, launch_config

DEVICE = "cuda" if HAS_CUDA else "cpu"
F64 = torch.float64
N, M, D = 5, 7, 24


def _reference(spec: bw.Spec, a, s, k, bias, targets, row_base, labels, key_labels):
    """Per-anchor losses in float64, from the materialized logits."""
    logits = (a * (s[:, None] if s.numel() > 1 else s)) @ k.T
    n, m = logits.shape
    own = torch.arange(m)[None, :] == (row_base + torch.arange(n))[:, None]
    if spec.sigmoid:
        labels_pm = torch.where(own, 1.0, -1.0).to(F64)
        return F.softplus(-labels_pm * (logits + bias)).sum(1)
    keep = ~own if spec.exclude_self else torch.ones_like(own)
    if spec.supcon:
        pos = (labels[:, None] == key_labels[None, :]) & ~own
        cnt = pos.sum(1)
        lse = torch.logsumexp(logits.masked_fill(~keep, float("-inf")), 1)
        mean_pos = torch.where(pos, logits, 0.0).sum(1) / cnt.clamp(min=1)
        return torch.where(cnt > 0, lse - mean_pos, 0.0)
    is_t = torch.arange(m)[None, :] == targets[:, None]
    if spec.decoupled:
        keep = keep & ~is_t
    rows = torch.logsumexp(logits.masked_fill(~keep, float("-inf")), 1) - logits[torch.arange(n), targets]
    if spec.symmetric:  # key j's positive is anchor j (n == m, targets = arange, row_base = 0)
        keep_c = ~is_t if spec.decoupled else torch.ones_like(is_t)
        cols = torch.logsumexp(logits.masked_fill(~keep_c, float("-inf")), 0) - logits.diagonal()
        rows = 0.5 * (rows + cols)
    return rows


def _case(name):
    """(spec, anchors, keys, per-anchor scale?, engine keyword arguments) of a named case."""
    g = torch.Generator().manual_seed(7)
    n, m, kw = N, M, {}
    if name == "info_nce":  # targets in every block, two anchors sharing one
        spec, kw = bw.Spec(), dict(targets=torch.tensor([6, 0, 4, 4, 2]), row_base=1)
    elif name == "decoupled":
        spec, kw = bw.Spec(decoupled=True), dict(targets=torch.tensor([3, 1, 6, 5, 0]), row_base=2)
    elif name == "nt_xent":  # own column out (anchors are keys 2..6), targets elsewhere; DCL
        spec, kw = bw.Spec(exclude_self=True, decoupled=True), dict(targets=torch.tensor([5, 6, 0, 1, 3]),
                                                                   row_base=2)
    elif name == "supcon":  # anchor 3 has no positive; anchors are keys 1..5
        spec = bw.Spec(exclude_self=True, supcon=True)
        kw = dict(labels=torch.tensor([0, 1, 0, 3, 1]), key_labels=torch.tensor([2, 0, 1, 0, 3, 1, 1]), row_base=1)
    elif name == "siglip":  # own pairs at keys 1..5
        spec, kw = bw.Spec(sigmoid=True), dict(row_base=1)
    elif name in ("clip", "clip_decoupled"):  # square: key j's column loss against every anchor
        spec, m = bw.Spec(symmetric=True, decoupled=name == "clip_decoupled"), N
        kw = dict(targets=torch.arange(n))
    a = F.normalize(torch.randn(n, D, generator=g, dtype=F64), dim=1)
    k = F.normalize(torch.randn(m, D, generator=g, dtype=F64), dim=1)
    per_anchor = name in ("info_nce", "clip_decoupled", "nt_xent")
    return spec, a, k, per_anchor, kw


CASES = ["info_nce", "decoupled", "nt_xent", "supcon", "siglip", "clip", "clip_decoupled"]


def _run(name, dtype, path, block_rows, s_values=None):
    spec, a64, k64, per_anchor, kw = _case(name)
    a64, k64 = a64.to(dtype).to(F64), k64.to(dtype).to(F64)  # the low-precision values, exactly
    s64 = (torch.linspace(8.0, 14.0, N, dtype=F64) if per_anchor else torch.tensor([10.0], dtype=F64))
    if s_values is not None:
        s64 = torch.tensor(s_values, dtype=F64)
    b64 = torch.tensor([-4.0], dtype=F64)
    leaves64 = [x.clone().requires_grad_() for x in (a64, k64, s64, b64)]
    leaves = [x.to(DEVICE, dt).requires_grad_() for x, dt in zip((a64, k64, s64, b64),
                                                                (dtype, dtype, torch.float32, torch.float32))]
    dev_kw = {key: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for key, v in kw.items()}
    backend = "triton" if path == "triton" else "torch"
    assert bw.use_kernels(backend, leaves[0]) == (path == "triton")
    rows, _ = bw.loss(spec, leaves[0], leaves[2], leaves[1], None, bias=leaves[3], backend=backend,
                      block_rows=block_rows, **dev_kw)
    want = _reference(spec, *leaves64[:1], leaves64[2], leaves64[1], leaves64[3], kw.get("targets"),
                      kw.get("row_base", 0), kw.get("labels"), kw.get("key_labels"))
    assert rows.dtype == torch.float32
    assert_close(rows, want, dtype, name=f"{name} rows")
    cot = torch.randn(N, dtype=F64)
    used = [0, 1, 2] + ([3] if spec.sigmoid else [])  # the bias enters SigLIP only
    got = torch.autograd.grad(rows, [leaves[i] for i in used], cot.to(DEVICE, torch.float32))
    exp = torch.autograd.grad(want, [leaves64[i] for i in used], cot)
    for i, g, e in zip(used, got, exp):
        assert g.dtype == leaves[i].dtype and g.shape == leaves[i].shape, (i, g.dtype, g.shape)
        assert_close(g, e, dtype, name=f"{name} grad of {('a', 'keys', 's', 'bias')[i]}")


@pytest.fixture(params=["default_tiles", "small_tiles"])
def tiles(request):
    # 16 is tl.dot's minimum: D = 24 then takes the chunked-D loops, the default tiles the resident ones.
    if request.param == "default_tiles":
        yield
        return
    with launch_config.override(block_m=16, block_n=16, block_d=16, block_dout=16):
        yield


@pytest.mark.parametrize("block_rows", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else []))
@pytest.mark.parametrize("name", CASES)
def test_triton_path_matches_float64(name, dtype, block_rows, tiles):
    _run(name, dtype, "triton", block_rows)


@pytest.mark.parametrize("block_rows", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", CASES)
def test_torch_path_matches_float64(name, dtype, block_rows):
    _run(name, dtype, "torch", block_rows)


@pytest.mark.parametrize("block_rows", [None, 3])
@pytest.mark.parametrize("name", ["clip", "info_nce", "nt_xent"])
def test_triton_path_extreme_scales(name, block_rows):
    """One anchor at scale 400, the others at 1: the fixed shift (≈ 400·log2 e) leaves the rows' sums under
    the trusted range, so the device-side repair pass recomputes them; the small rows' LSEs lie ~300 (base 2)
    under the largest, past what even the interpreter's unflushed subnormals hold, so the symmetric backward
    is right only if its guard hands the pass to the two-exp kernels."""
    _run(name, torch.float32, "triton", block_rows, s_values=[400.0, 1.0, 1.0, 1.0, 1.0])


def test_triton_path_key_split(monkeypatch):
    """Few anchors, many keys: the kernels split the keys over programs (partial LSEs, fp32 dA partials)."""
    monkeypatch.setattr(contrastive, "_SPLIT_PROGRAMS", 8)
    g = torch.Generator().manual_seed(3)
    n, m = 3, 150
    a64 = F.normalize(torch.randn(n, D, generator=g, dtype=F64), dim=1)
    k64 = F.normalize(torch.randn(m, D, generator=g, dtype=F64), dim=1)
    targets = torch.tensor([149, 0, 77])
    s64 = torch.tensor([12.0], dtype=F64)
    leaves64 = [x.clone().requires_grad_() for x in (a64, k64, s64)]
    leaves = [x.to(DEVICE, torch.float32).requires_grad_() for x in (a64, k64, s64)]
    with launch_config.override(block_m=16, block_n=16, block_d=16, block_dout=16):
        assert contrastive._key_split(1, m, 16, leaves[0].device)[0] > 1  # the case this test is for
        rows, _ = bw.loss(bw.Spec(decoupled=True), leaves[0], leaves[2], leaves[1], None,
                          targets=targets.to(DEVICE), backend="triton")
        want = _reference(bw.Spec(decoupled=True), leaves64[0], leaves64[2], leaves64[1], None, targets, 0,
                          None, None)
        assert_close(rows, want, torch.float32, name="rows")
        got = torch.autograd.grad(rows.sum(), leaves)
    for g_, e, what in zip(got, torch.autograd.grad(want.sum(), leaves64), ("a", "keys", "s")):
        assert_close(g_, e, torch.float32, name=f"grad of {what}")


def test_path_choice():
    """CPU tensors take the torch path unless backend="triton" (interpreter); fp64 always the torch path."""
    x = torch.zeros(2, 4, device=DEVICE)
    assert bw.use_kernels("torch", x) is False
    assert bw.use_kernels("triton", x) is True
    assert bw.use_kernels("triton", x.double()) is False
    assert bw.use_kernels(None, x) is HAS_CUDA
