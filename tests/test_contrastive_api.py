"""The contrastive losses of shared/API.md (info_nce, nt_xent, clip_loss, siglip_loss, moco_loss, supcon_loss)
through the public functions, against float64 math written here (never sslkernels.reference).

Each case checks the loss and the gradient of every differentiable input (features, tensor temperature /
logit_scale / logit_bias, per-anchor temperature) for one random cotangent, in float64 (rtol 1e-6) and
float32 (rtol 1e-4), on odd sizes. Backends: "torch" (the eager oracle), "auto" (on CPU the
memory-efficient path) and "auto" with tiny row chunks, so the chunked path crosses several chunks.

The expected_* functions are imported by test_nn_modules.py.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close

import sslkernels

F64 = torch.float64
DTYPES = [torch.float64, torch.float32]
REDUCTIONS = ["mean", "sum", "none"]
BACKENDS = ["torch", "auto", "auto-chunked"]
# (temperature kind, reduction): every kind and every reduction, without the full product (runtime).
TEMP_REDUCTIONS = [("float", "mean"), ("0d", "none"), ("0d", "sum"), ("float", "none"), ("0d", "mean")]
TEMP_REDUCTIONS_1D = TEMP_REDUCTIONS + [("1d", "mean"), ("1d", "none"), ("1d", "sum")]


# ------------------------------------------------------------------------------------ float64 math


def _row_lse(logits, keep):
    """log Σ_j keep_ij·exp(logits_ij) per row, shifted by the row max of the kept entries."""
    shift = logits.masked_fill(~keep, float("-inf")).amax(dim=1, keepdim=True).detach()
    e = torch.exp(torch.where(keep, logits - shift, torch.full_like(logits, float("-inf"))))
    return torch.log(e.sum(dim=1)) + shift.squeeze(1)


def _ce_rows(logits, targets, decoupled, exclude_self=False):
    """Row i: log Σ_j exp(logits_ij) − logits_{i,t_i}, the sum over the allowed j."""
    n, m = logits.shape
    rows = torch.arange(n)
    keep = torch.ones(n, m, dtype=torch.bool)
    if exclude_self:
        keep[rows, rows] = False
    if decoupled:
        keep[rows, targets] = False
    return _row_lse(logits, keep) - logits[rows, targets]


def _per_row_divide(logits, tau):
    if isinstance(tau, torch.Tensor) and tau.dim() == 1:
        return logits / tau[:, None]
    return logits / tau


def reduce(rows, reduction):
    return rows.mean() if reduction == "mean" else rows.sum() if reduction == "sum" else rows


def expected_info_nce(q, k, tau, targets=None, symmetric=False, decoupled=False, reduction="mean"):
    logits = _per_row_divide(q @ k.T, tau)
    n = q.shape[0]
    t = torch.arange(n) if targets is None else targets
    if decoupled:
        rows = _ce_rows(logits, t, True)
    else:
        rows = F.cross_entropy(logits, t, reduction="none")
    if symmetric:
        cols = _ce_rows(logits.T, t, True) if decoupled else F.cross_entropy(logits.T, t, reduction="none")
        rows = 0.5 * (rows + cols)
    return reduce(rows, reduction)


def expected_nt_xent(z1, z2, tau, decoupled=False, reduction="mean"):
    z = torch.cat([z1, z2])
    n2 = z.shape[0]
    logits = z @ z.T / tau
    pos = (torch.arange(n2) + n2 // 2) % n2
    return reduce(_ce_rows(logits, pos, decoupled, exclude_self=True), reduction)


def expected_clip(img, txt, scale, reduction="mean"):
    logits = scale * img @ txt.T
    t = torch.arange(img.shape[0])
    rows = 0.5 * (F.cross_entropy(logits, t, reduction="none") + F.cross_entropy(logits.T, t, reduction="none"))
    return reduce(rows, reduction)


def expected_siglip(img, txt, scale, bias, reduction="mean"):
    n = img.shape[0]
    logits = scale * img @ txt.T + bias
    labels = 2 * torch.eye(n, dtype=F64) - 1
    # −log σ(x) = log(1 + e^{−x}), written out rather than through F.logsigmoid.
    pair = torch.log1p(torch.exp(-labels * logits))
    return reduce(pair.sum(dim=1), reduction)


def expected_moco(q, k, queue, tau, reduction="mean"):
    logits = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ queue.T], dim=1) / tau
    return reduce(F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long), reduction="none"), reduction)


def expected_supcon(f, labels, tau, reduction="mean"):
    """Khosla et al. L_out, anchor by anchor; anchors with no positive give 0 and leave the mean."""
    n = f.shape[0]
    logits = f @ f.T / tau
    rows, valid = [], []
    for i in range(n):
        others = [a for a in range(n) if a != i]
        positives = [p for p in others if int(labels[p]) == int(labels[i])]
        if not positives:
            rows.append((f[i] * 0).sum())
            valid.append(False)
            continue
        log_den = torch.logsumexp(logits[i, others], dim=0)
        rows.append(-torch.stack([logits[i, p] - log_den for p in positives]).mean())
        valid.append(True)
    rows = torch.stack(rows)
    if reduction == "mean":
        nv = sum(valid)
        return rows.sum() / max(nv, 1)
    return reduce(rows, reduction)


# ------------------------------------------------------------------------------------ helpers


@pytest.fixture
def backend(request, monkeypatch):
    name = request.param
    if name == "auto-chunked":
        from sslkernels.ops import contrastive_cpu

        # A handful of logits per chunk: every input spans several chunks with a ragged last one.
        monkeypatch.setattr(contrastive_cpu, "CHUNK_ELEMENTS", 40)
        return "auto"
    return name


def leaves(x64, dtype):
    """(tested leaf in ``dtype``, float64 leaf holding the very same values)."""
    x = x64.detach().to(dtype).requires_grad_()
    return x, x.detach().to(F64).requires_grad_()


def unit_rows(n, d):
    return F.normalize(torch.randn(n, d, dtype=F64), dim=1)


def make_temperature(kind, value, dtype, n=None):
    """A temperature as the op takes it (float, 0-d or per-anchor 1-d tensor) and its float64 twin."""
    if kind == "float":
        return value, value
    t = torch.tensor(value, dtype=F64) if kind == "0d" else value * (0.5 + torch.rand(n, dtype=F64))
    return leaves(t, dtype)


def check(out, want, got_leaves, want_leaves, dtype):
    """Loss values, then the gradient of every leaf for one random cotangent."""
    assert out.dtype == dtype, f"loss dtype {out.dtype}, inputs {dtype}"
    assert out.shape == want.shape, f"loss shape {tuple(out.shape)} != {tuple(want.shape)}"
    assert_close(out, want, dtype, name="loss")
    cot = torch.randn_like(want)
    grads = torch.autograd.grad(out, got_leaves, cot.to(out.dtype), allow_unused=True)
    wants = torch.autograd.grad(want, want_leaves, cot, allow_unused=True)
    for i, (g, w, leaf) in enumerate(zip(grads, wants, got_leaves)):
        if w is None:
            w = torch.zeros(leaf.shape, dtype=F64)
        assert g is not None, f"input {i} got no gradient"
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        assert_close(g, w, dtype, name=f"grad of input {i}")


def _tensor_leaves(*pairs):
    """Split (tested, float64) pairs into two lists, dropping plain floats."""
    got = [a for a, b in pairs if isinstance(a, torch.Tensor)]
    want = [b for a, b in pairs if isinstance(a, torch.Tensor)]
    return got, want


# ------------------------------------------------------------------------------------ info_nce

# (N, M, D, targets?, symmetric, decoupled)
INFO_NCE_CASES = [
    (1, 1, 7, False, False, False),
    (13, 13, 7, False, False, False),
    (13, 13, 33, False, True, False),
    (13, 13, 7, False, False, True),
    (13, 13, 7, False, True, True),
    (1, 5, 7, True, False, False),
    (13, 29, 7, True, False, False),
    (13, 29, 33, True, False, True),
]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tkind,reduction", TEMP_REDUCTIONS_1D)
@pytest.mark.parametrize("n,m,d,with_targets,symmetric,decoupled", INFO_NCE_CASES)
def test_info_nce(n, m, d, with_targets, symmetric, decoupled, tkind, reduction, dtype, backend):
    q, q64 = leaves(unit_rows(n, d), dtype)
    k, k64 = leaves(unit_rows(m, d), dtype)
    tau, tau64 = make_temperature(tkind, 0.1, dtype, n)
    targets = torch.randint(0, m, (n,)) if with_targets else None
    out = sslkernels.info_nce(q, k, tau, targets=targets, symmetric=symmetric, decoupled=decoupled,
                              reduction=reduction, backend=backend)
    want = expected_info_nce(q64, k64, tau64, targets, symmetric, decoupled, reduction)
    got_l, want_l = _tensor_leaves((q, q64), (k, k64), (tau, tau64))
    check(out, want, got_l, want_l, dtype)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_info_nce_defaults_and_unnormalized_features(backend):
    # Default temperature 0.1 and "mean"; features not normalized (the function must not normalize them).
    q, q64 = leaves(torch.randn(13, 7, dtype=F64) * 0.3, F64)
    k, k64 = leaves(torch.randn(13, 7, dtype=F64) * 0.3, F64)
    out = sslkernels.info_nce(q, k, backend=backend)
    check(out, expected_info_nce(q64, k64, 0.1), [q, k], [q64, k64], F64)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_info_nce_key_without_grad(backend):
    q, q64 = leaves(unit_rows(13, 7), torch.float32)
    k = unit_rows(13, 7).float()
    out = sslkernels.info_nce(q, k, 0.2, backend=backend)
    check(out, expected_info_nce(q64, k.double(), 0.2), [q], [q64], torch.float32)


# ------------------------------------------------------------------------------------ nt_xent


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tkind,reduction", TEMP_REDUCTIONS)
# decoupled needs a negative, so N >= 2 there (test_validation covers the error for N = 1).
@pytest.mark.parametrize("n,d,decoupled", [(1, 7, False), (2, 5, False), (13, 7, False), (13, 33, False),
                                           (2, 5, True), (13, 7, True), (13, 33, True)])
def test_nt_xent(n, d, decoupled, tkind, reduction, dtype, backend):
    z1, z1_64 = leaves(unit_rows(n, d), dtype)
    z2, z2_64 = leaves(unit_rows(n, d), dtype)
    tau, tau64 = make_temperature(tkind, 0.5, dtype)
    out = sslkernels.nt_xent(z1, z2, tau, decoupled=decoupled, reduction=reduction, backend=backend)
    want = expected_nt_xent(z1_64, z2_64, tau64, decoupled, reduction)
    if reduction == "none":
        assert out.shape == (2 * n,)
    got_l, want_l = _tensor_leaves((z1, z1_64), (z2, z2_64), (tau, tau64))
    check(out, want, got_l, want_l, dtype)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_nt_xent_default_temperature(backend):
    z1, z1_64 = leaves(unit_rows(13, 7), F64)
    z2, z2_64 = leaves(unit_rows(13, 7), F64)
    out = sslkernels.nt_xent(z1, z2, backend=backend)
    check(out, expected_nt_xent(z1_64, z2_64, 0.5), [z1, z2], [z1_64, z2_64], F64)


# ------------------------------------------------------------------------------------ clip / siglip


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("skind,reduction", TEMP_REDUCTIONS)
@pytest.mark.parametrize("n,d", [(1, 7), (13, 7), (13, 33)])
def test_clip_loss(n, d, skind, reduction, dtype, backend):
    img, img64 = leaves(unit_rows(n, d), dtype)
    txt, txt64 = leaves(unit_rows(n, d), dtype)
    scale, scale64 = make_temperature(skind, 14.3, dtype)  # OpenCLIP's initial exp(log(1/0.07))
    out = sslkernels.clip_loss(img, txt, scale, reduction=reduction, backend=backend)
    want = expected_clip(img64, txt64, scale64, reduction)
    got_l, want_l = _tensor_leaves((img, img64), (txt, txt64), (scale, scale64))
    check(out, want, got_l, want_l, dtype)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,reduction", TEMP_REDUCTIONS)
@pytest.mark.parametrize("n,d", [(1, 7), (13, 7), (13, 33)])
def test_siglip_loss(n, d, kind, reduction, dtype, backend):
    img, img64 = leaves(unit_rows(n, d), dtype)
    txt, txt64 = leaves(unit_rows(n, d), dtype)
    scale, scale64 = make_temperature(kind, 10.0, dtype)  # SigLIP's init: t' = log 10, b = −10
    bias, bias64 = (-10.0, -10.0) if kind == "float" else leaves(torch.tensor(-10.0, dtype=F64), dtype)
    out = sslkernels.siglip_loss(img, txt, scale, bias, reduction=reduction, backend=backend)
    want = expected_siglip(img64, txt64, scale64, bias64, reduction)
    got_l, want_l = _tensor_leaves((img, img64), (txt, txt64), (scale, scale64), (bias, bias64))
    check(out, want, got_l, want_l, dtype)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_siglip_loss_positive_bias_large_logits(backend):
    # Large |logits| where log σ saturates: log1p(exp(−x)) in float64 is still exact here.
    img, img64 = leaves(unit_rows(13, 7), torch.float32)
    txt, txt64 = leaves(unit_rows(13, 7), torch.float32)
    out = sslkernels.siglip_loss(img, txt, 30.0, 3.0, backend=backend)
    check(out, expected_siglip(img64, txt64, 30.0, 3.0), [img, txt], [img64, txt64], torch.float32)


# ------------------------------------------------------------------------------------ moco


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("key_grad,tkind,reduction",
                         [(True, "float", "mean"), (True, "0d", "none"), (False, "0d", "sum"), (False, "float", "none")])
@pytest.mark.parametrize("n,k_size,d", [(1, 5, 7), (13, 37, 7), (13, 17, 33)])
def test_moco_loss(n, k_size, d, key_grad, tkind, reduction, dtype, backend):
    q, q64 = leaves(unit_rows(n, d), dtype)
    if key_grad:
        k, k64 = leaves(unit_rows(n, d), dtype)
    else:
        k = unit_rows(n, d).to(dtype)
        k64 = k.double()
    queue = unit_rows(k_size, d).to(dtype).requires_grad_()  # must still get no gradient
    tau, tau64 = make_temperature(tkind, 0.2, dtype)
    out = sslkernels.moco_loss(q, k, queue, tau, reduction=reduction, backend=backend)
    want = expected_moco(q64, k64, queue.detach().double(), tau64, reduction)
    pairs = [(q, q64)] + ([(k, k64)] if key_grad else []) + [(tau, tau64)]
    got_l, want_l = _tensor_leaves(*pairs)
    check(out, want, got_l, want_l, dtype)
    # The queue gets no gradient: unused by autograd, or a zero gradient at most.
    out = sslkernels.moco_loss(q, k, queue, tau, reduction="sum", backend=backend)
    (gq,) = torch.autograd.grad(out, [queue], allow_unused=True)
    assert gq is None or not gq.any()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_moco_loss_default_temperature(backend):
    q, q64 = leaves(unit_rows(13, 7), F64)
    k, k64 = leaves(unit_rows(13, 7), F64)
    queue = unit_rows(21, 7)
    out = sslkernels.moco_loss(q, k, queue, backend=backend)
    check(out, expected_moco(q64, k64, queue, 0.2), [q, k], [q64, k64], F64)


# ------------------------------------------------------------------------------------ supcon


def _labels(n, classes=4):
    labels = torch.randint(0, classes, (n,))
    if n > 2:
        labels[-1] = 99  # one anchor with no positive
        labels[0] = labels[1] = 1  # and at least one pair
    return labels


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tkind,reduction", TEMP_REDUCTIONS)
@pytest.mark.parametrize("n,d", [(2, 7), (13, 7), (13, 33)])
def test_supcon_loss(n, d, tkind, reduction, dtype, backend):
    f, f64 = leaves(unit_rows(n, d), dtype)
    labels = _labels(n)
    tau, tau64 = make_temperature(tkind, 0.1, dtype)
    out = sslkernels.supcon_loss(f, labels, tau, reduction=reduction, backend=backend)
    want = expected_supcon(f64, labels, tau64, reduction)
    got_l, want_l = _tensor_leaves((f, f64), (tau, tau64))
    check(out, want, got_l, want_l, dtype)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_supcon_anchors_without_positive(backend):
    """They contribute exactly 0 to "none", are left out of "mean", and get no gradient of their own."""
    f, f64 = leaves(unit_rows(7, 5), F64)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 3])  # anchors 2 and 6 have no positive
    rows = sslkernels.supcon_loss(f, labels, 0.1, reduction="none", backend=backend)
    assert rows[2].item() == 0.0 and rows[6].item() == 0.0
    mean = sslkernels.supcon_loss(f, labels, 0.1, backend=backend)
    assert_close(mean, rows.sum() / 5, F64)
    check(mean, expected_supcon(f64, labels, 0.1), [f], [f64], F64)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_supcon_no_positive_at_all(reduction, backend):
    # N = 1, or all labels distinct: every anchor is left out; the loss is 0 (not NaN) with a zero gradient.
    for n in (1, 5):
        f, f64 = leaves(unit_rows(n, 7), F64)
        labels = torch.arange(n)
        out = sslkernels.supcon_loss(f, labels, reduction=reduction, backend=backend)
        want = expected_supcon(f64, labels, 0.1, reduction)
        check(out, want, [f], [f64], F64)
        assert not out.detach().any()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_supcon_labels_any_integer_values(backend):
    f, f64 = leaves(unit_rows(13, 7), F64)
    labels = torch.tensor([-5, 7, 7, 1000, -5, 3, 3, 3, 1000, 8, -5, 7, 42], dtype=torch.int32)
    out = sslkernels.supcon_loss(f, labels, 0.3, backend=backend)
    check(out, expected_supcon(f64, labels, 0.3), [f], [f64], F64)


# ------------------------------------------------------------------------------------ half-precision scalars


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("tdtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["info_nce", "nt_xent", "moco_loss", "supcon_loss", "clip_loss"])
def test_half_precision_temperature_with_fp32_features(op, tdtype, backend):
    # A bf16 / fp16 temperature (or logit_scale) means its own value (bf16 0.07 is 0.0698...), as the reference
    # uses it: 1/τ formed in the scalar's dtype would be 6e-4 off. clip_loss at logit_scale 100 with an upstream
    # of 1024 (a GradScaler's) must give a finite gradient: an fp16 double inverse passed s²·∂L/∂s (inf).
    n, d = 11, 7
    feats = [leaves(unit_rows(n, d), torch.float32) for _ in range(2)]
    (a, a64), (b, b64) = feats
    t = torch.tensor(100.0 if op == "clip_loss" else 0.07, dtype=tdtype, requires_grad=True)
    t64 = t.detach().double().requires_grad_()
    queue = unit_rows(17, d)
    labels = torch.randint(0, 3, (n,))
    calls = {
        "info_nce": (lambda x, y, tau, **kw: sslkernels.info_nce(x, y, tau, **kw), expected_info_nce),
        "nt_xent": (lambda x, y, tau, **kw: sslkernels.nt_xent(x, y, tau, **kw), expected_nt_xent),
        "moco_loss": (lambda x, y, tau, **kw: sslkernels.moco_loss(x, y, queue.to(x.dtype), tau, **kw),
                      lambda x, y, tau: expected_moco(x, y, queue, tau)),
        "supcon_loss": (lambda x, y, tau, **kw: sslkernels.supcon_loss(x, labels, tau, **kw),
                        lambda x, y, tau: expected_supcon(x, labels, tau)),
        "clip_loss": (lambda x, y, s, **kw: sslkernels.clip_loss(x, y, s, **kw), expected_clip),
    }
    ours, expected = calls[op]
    out = ours(a, b, t, backend=backend)
    want = expected(a64, b64, t64)
    assert_close(out, want, torch.float32, name="loss")
    upstream = 1024.0 if op == "clip_loss" else 16.0  # dL/dτ·1024 at τ = 0.07 would overflow fp16 itself
    grads = torch.autograd.grad(out * upstream, [a, t], allow_unused=True)
    wants = torch.autograd.grad(want * upstream, [a64, t64])
    assert_close(grads[0], wants[0], torch.float32, name="grad of the features")
    assert grads[1].dtype == tdtype
    assert_close(grads[1], wants[1], tdtype, name="grad of the temperature")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("idx_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32], ids=str)
def test_info_nce_targets_of_any_integer_dtype(idx_dtype, backend):
    q, q64 = leaves(unit_rows(6, 7), F64)
    k, k64 = leaves(unit_rows(9, 7), F64)
    targets = torch.tensor([0, 1, 2, 3, 4, 8])
    out = sslkernels.info_nce(q, k, 0.2, targets=targets.to(idx_dtype), backend=backend)
    check(out, expected_info_nce(q64, k64, 0.2, targets), [q, k], [q64, k64], F64)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_is_an_error_not_a_silent_constant(reduction, backend):
    # A gradient penalty loss + ‖∂loss/∂q‖²: the gradient the kernels give has no graph, so differentiating it
    # again would treat it as a constant and silently drop the penalty's gradient. Every path either matches the
    # "torch" oracle's second derivative (the CPU path's "none" is plain autograd) or refuses.
    w = torch.randn(7, 7, dtype=F64, requires_grad=True)
    q0, k = unit_rows(6, 7), unit_rows(6, 7)

    def penalized_grad(name):
        q = q0 @ w
        loss = sslkernels.info_nce(q, k, 0.2, reduction=reduction, backend=name).sum()
        (g,) = torch.autograd.grad(loss, q, create_graph=True)
        return torch.autograd.grad(loss + g.square().sum(), w)[0]

    if backend != "torch" and reduction != "none":
        with pytest.raises(RuntimeError, match="first-order only"):
            penalized_grad(backend)
        loss = sslkernels.info_nce(q0 @ w, k, 0.2, reduction=reduction, backend=backend)
        torch.autograd.grad(loss.sum(), w)  # a plain backward is unaffected
    else:
        assert_close(penalized_grad(backend), penalized_grad("torch"), F64, name="second-order gradient")


# ------------------------------------------------------------------------------------ distributed keywords


@pytest.mark.parametrize("kwargs", [{"gather_distributed": True}, {"distributed": "ring"},
                                    {"gather_distributed": True, "distributed": "ring", "process_group": None}])
def test_distributed_keywords_without_process_group_give_the_local_loss(kwargs):
    # torch.distributed is not initialized here: every contrastive loss is its single-process loss.
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    q, k, queue = unit_rows(13, 7), unit_rows(13, 7), unit_rows(21, 7)
    labels = _labels(13)
    pairs = [
        (sslkernels.info_nce(q, k, 0.1, **kwargs), expected_info_nce(q, k, 0.1)),
        (sslkernels.info_nce(q, k, 0.1, symmetric=True, **kwargs), expected_info_nce(q, k, 0.1, symmetric=True)),
        (sslkernels.nt_xent(q, k, 0.5, **kwargs), expected_nt_xent(q, k, 0.5)),
        (sslkernels.clip_loss(q, k, 14.3, **kwargs), expected_clip(q, k, 14.3)),
        (sslkernels.siglip_loss(q, k, 10.0, -10.0, **kwargs), expected_siglip(q, k, 10.0, -10.0)),
        (sslkernels.moco_loss(q, k, queue, 0.2, **kwargs), expected_moco(q, k, queue, 0.2)),
        (sslkernels.supcon_loss(q, labels, 0.1, **kwargs), expected_supcon(q, labels, 0.1)),
    ]
    for i, (got, want) in enumerate(pairs):
        assert_close(got, want, F64, name=f"loss {i}")


def test_the_chunked_cpu_path_never_makes_an_n_by_n_tensor(monkeypatch):
    """Every op of each CPU loss, forward and backward, stays within a chunk of logits or the inputs' size
    (supcon's positive counts were an N×N comparison)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from sslkernels.ops import contrastive_cpu

    n, d = 64, 8
    monkeypatch.setattr(contrastive_cpu, "CHUNK_ELEMENTS", 8 * n)  # 8 rows of logits per chunk: N·N is 8×
    biggest = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    biggest.append((t.numel(), str(func)))
            return out

    labels = torch.arange(n) % 5
    calls = {
        "info_nce": lambda a, b, t: sslkernels.info_nce(a, b, t, symmetric=True),
        "nt_xent": lambda a, b, t: sslkernels.nt_xent(a, b, t),
        "moco_loss": lambda a, b, t: sslkernels.moco_loss(a, b, b.detach() * 2, t),
        "supcon_loss": lambda a, b, t: sslkernels.supcon_loss(a, labels, t),
        "siglip_loss": lambda a, b, t: sslkernels.siglip_loss(a, b, t, t),
    }
    for name, call in calls.items():
        a, b = torch.randn(n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)
        t = torch.tensor(0.5, requires_grad=True)
        biggest.clear()
        with Record():
            call(a, b, t).backward()
        assert a.grad is not None and t.grad is not None, name
        worst = max(biggest)
        assert worst[0] <= 2 * 8 * n, f"{name}: {worst}"  # nt_xent's chunks span 2N keys

