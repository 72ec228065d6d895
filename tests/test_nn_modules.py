"""sslkernels.nn modules: their own constructors and the drop-in signatures of lightly, OpenCLIP and the
official DINO code, against the float64 math of the functional tests (values and input gradients)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_close

import sslkernels
from sslkernels import nn as snn

from test_contrastive_api import (check, expected_clip, expected_info_nce, expected_moco, expected_nt_xent,
                                  expected_supcon, leaves)
from test_objectives_api import expected_barlow, expected_dino, expected_neg_cos, expected_vicreg

F64, F32 = torch.float64, torch.float32
DTYPES = [F64, F32]
MODULES = ["InfoNCELoss", "NTXentLoss", "ClipLoss", "MoCoLoss", "SupConLoss", "DCLLoss", "DINOLoss",
           "NegativeCosineSimilarity", "BarlowTwinsLoss", "VICRegLoss"]


def _unit(n, d):
    return F.normalize(torch.randn(n, d, dtype=F64), dim=1)


@pytest.mark.parametrize("name", MODULES)
def test_exported_modules(name):
    cls = getattr(snn, name)
    assert issubclass(cls, nn.Module)


# ------------------------------------------------------------------------- contrastive modules


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kwargs,with_targets", [({}, False), ({"temperature": 0.2, "symmetric": True}, False),
                                                 ({"decoupled": True, "reduction": "none"}, False),
                                                 ({"temperature": 0.07, "reduction": "sum"}, True)])
def test_info_nce_loss(kwargs, with_targets, dtype):
    n, m = 13, (29 if with_targets else 13)
    q, q64 = leaves(_unit(n, 7), dtype)
    k, k64 = leaves(_unit(m, 7), dtype)
    targets = torch.randint(0, m, (n,)) if with_targets else None
    loss = snn.InfoNCELoss(**kwargs)
    out = loss(q, k, targets) if with_targets else loss(q, k)
    want = expected_info_nce(q64, k64, kwargs.get("temperature", 0.1), targets, kwargs.get("symmetric", False),
                             kwargs.get("decoupled", False), kwargs.get("reduction", "mean"))
    check(out, want, [q, k], [q64, k64], dtype)


def test_info_nce_loss_learnable_temperature():
    tau = nn.Parameter(torch.tensor(0.1, dtype=F64))
    tau64 = tau.detach().clone().requires_grad_()
    q, q64 = leaves(_unit(13, 7), F64)
    k, k64 = leaves(_unit(13, 7), F64)
    out = snn.InfoNCELoss(tau)(q, k)
    check(out, expected_info_nce(q64, k64, tau64), [q, k, tau], [q64, k64, tau64], F64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("args", [(), (0.1,), (0.2, 0, False)])
def test_ntxent_loss_lightly_signature(args, dtype):
    # lightly's NTXentLoss normalizes out0 / out1 itself, then SimCLR's loss averaged over all 2N rows.
    z1, z1_64 = leaves(torch.randn(13, 7, dtype=F64) * 3, dtype)
    z2, z2_64 = leaves(torch.randn(13, 7, dtype=F64) * 3, dtype)
    out = snn.NTXentLoss(*args)(z1, z2)
    tau = args[0] if args else 0.5
    want = expected_nt_xent(F.normalize(z1_64, dim=1), F.normalize(z2_64, dim=1), tau)
    check(out, want, [z1, z2], [z1_64, z2_64], dtype)


def test_ntxent_loss_keywords():
    loss = snn.NTXentLoss(temperature=0.3, memory_bank_size=0, gather_distributed=False)
    z1, z2 = torch.randn(5, 4, dtype=F64), torch.randn(5, 4, dtype=F64)
    assert_close(loss(z1, z2), expected_nt_xent(F.normalize(z1, dim=1), F.normalize(z2, dim=1), 0.3), F64)


def test_ntxent_loss_memory_bank():
    """lightly's MoCo mode: out0 against out1 (positive) and the bank as it was before the step;
    normalized out1 is then written into the bank (only when out0 requires grad), lightly's way: a batch
    reaching the end of the bank is cut there and the pointer goes back to 0."""
    loss = snn.NTXentLoss(temperature=0.2, memory_bank_size=16)  # a bare int: the bank is sized at the first call
    out0, out1 = torch.randn(4, 7, dtype=F64, requires_grad=True), torch.randn(4, 7, dtype=F64)
    loss(out0, out1)
    bank = loss.memory_bank
    assert bank.bank.shape == (16, 7) and bank.bank_ptr.shape == (1,)
    assert loss.state_dict() == {}  # lightly's bank buffers are not persistent
    for b in (5, 5, 3, 4, 9):  # 4 + 5 + 5 = 14, then 3 rows of which 2 fit: cut, ptr -> 0
        before = bank.bank.detach().clone()
        ptr = int(bank.bank_ptr)
        o0, o0_64 = leaves(torch.randn(b, 7, dtype=F64), F64)
        o1 = torch.randn(b, 7, dtype=F64)
        out = loss(o0, o1)
        want = expected_moco(F.normalize(o0_64, dim=1), F.normalize(o1, dim=1), before.double(), 0.2)
        check(out, want, [o0], [o0_64], F64)
        n = min(b, 16 - ptr)
        after = before.clone()
        after[ptr:ptr + n] = F.normalize(o1, dim=1)[:n].float()
        assert_close(bank.bank, after, F32, name="bank after the step")
        assert int(bank.bank_ptr) == (0 if ptr + b >= 16 else ptr + b)
    # No gradient wanted: the bank stays as it is.
    before = bank.bank.clone()
    with torch.no_grad():
        loss(torch.randn(4, 7, dtype=F64), torch.randn(4, 7, dtype=F64))
    assert torch.equal(bank.bank, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("args", [(), (0.5,), (0.2, None, False)])
def test_dcl_loss_lightly_signature(args, dtype):
    # lightly's DCLLoss = ½(dcl(out0, out1) + dcl(out1, out0)) on normalized inputs: decoupled NT-Xent.
    z1, z1_64 = leaves(torch.randn(13, 7, dtype=F64), dtype)
    z2, z2_64 = leaves(torch.randn(13, 7, dtype=F64), dtype)
    out = snn.DCLLoss(*args)(z1, z2)
    tau = args[0] if args else 0.1
    want = expected_nt_xent(F.normalize(z1_64, dim=1), F.normalize(z2_64, dim=1), tau, decoupled=True)
    check(out, want, [z1, z2], [z1_64, z2_64], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_loss_openclip_signature(dtype):
    img, img64 = leaves(_unit(13, 7), dtype)
    txt, txt64 = leaves(_unit(13, 7), dtype)
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=dtype, requires_grad=True)
    log_scale64 = log_scale.detach().double().requires_grad_()
    loss = snn.ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1,
                        use_horovod=False)
    out = loss(img, txt, log_scale.exp())
    want = expected_clip(img64, txt64, log_scale64.exp())
    check(out, want, [img, txt, log_scale], [img64, txt64, log_scale64], dtype)
    d = snn.ClipLoss()(img, txt, log_scale.exp(), output_dict=True)
    assert set(d) == {"contrastive_loss"}
    assert_close(d["contrastive_loss"], want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_moco_loss_module(dtype):
    q, q64 = leaves(_unit(13, 7), dtype)
    k, k64 = leaves(_unit(13, 7), dtype)
    queue = _unit(37, 7).to(dtype)
    check(snn.MoCoLoss()(q, k, queue), expected_moco(q64, k64, queue.double(), 0.2), [q, k], [q64, k64], dtype)
    out = snn.MoCoLoss(0.07, reduction="none")(q, k, queue)
    check(out, expected_moco(q64, k64, queue.double(), 0.07, "none"), [q, k], [q64, k64], dtype)


def test_moco_loss_module_with_memory_queue():
    mq = sslkernels.MemoryQueue(21, 7, dtype=F64)
    mq.enqueue_(_unit(21, 7))
    q, q64 = leaves(_unit(5, 7), F64)
    k = _unit(5, 7)
    try:
        out = snn.MoCoLoss()(q, k, mq)
    except (TypeError, ValueError):
        out = snn.MoCoLoss()(q, k, mq.queue)
    check(out, expected_moco(q64, k, mq.queue.clone(), 0.2), [q], [q64], F64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_supcon_loss_module(dtype):
    f, f64 = leaves(_unit(13, 7), dtype)
    labels = torch.tensor([0, 1, 1, 2, 0, 3, 2, 2, 1, 0, 4, 3, 1])  # label 4: no positive
    check(snn.SupConLoss()(f, labels), expected_supcon(f64, labels, 0.1), [f], [f64], dtype)
    out = snn.SupConLoss(0.5, reduction="none")(f, labels)
    check(out, expected_supcon(f64, labels, 0.5, "none"), [f], [f64], dtype)


# ------------------------------------------------------------------------- non-contrastive modules


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("args", [(), (1, 1e-8)])
def test_negative_cosine_similarity_lightly_signature(args, dtype):
    # lightly's has no stop-gradient: both inputs get theirs.
    p, p64 = leaves(torch.randn(13, 7, dtype=F64), dtype)
    z, z64 = leaves(torch.randn(13, 7, dtype=F64), dtype)
    out = snn.NegativeCosineSimilarity(*args)(p, z)
    want = -F.cosine_similarity(p64, z64, dim=1).mean()
    check(out, want, [p, z], [p64, z64], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_negative_cosine_similarity_stop_gradient(dtype):
    p, p64 = leaves(torch.randn(13, 7, dtype=F64), dtype)
    z = torch.randn(13, 7, dtype=F64).to(dtype).requires_grad_()
    out = snn.NegativeCosineSimilarity(stop_gradient=True)(p, z)
    check(out, expected_neg_cos(p64, z.detach().double()), [p], [p64], dtype)
    assert z.grad is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lambda_param", [None, 0.01])
def test_barlow_twins_loss_module(lambda_param, dtype):
    # The paper's numbers (BatchNorm over the batch), whatever signature the module is built with.
    z1, z1_64 = leaves(torch.randn(13, 7, dtype=F64) * 2, dtype)
    z2, z2_64 = leaves(torch.randn(13, 7, dtype=F64) + 1, dtype)
    if lambda_param is None:
        out, want = snn.BarlowTwinsLoss()(z1, z2), expected_barlow(z1_64, z2_64)
    else:
        out = snn.BarlowTwinsLoss(lambda_param, False)(z1, z2)
        want = expected_barlow(z1_64, z2_64, lambda_param)
    check(out, want, [z1, z2], [z1_64, z2_64], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("args", [(), (10.0, 20.0, 2.0), (25.0, 25.0, 1.0, False, 1e-4)])
def test_vicreg_loss_lightly_signature(args, dtype):
    scale = torch.linspace(0.3, 2.0, 7, dtype=F64)
    z1, z1_64 = leaves(torch.randn(13, 7, dtype=F64) * scale, dtype)
    z2, z2_64 = leaves(torch.randn(13, 7, dtype=F64) * scale, dtype)
    out = snn.VICRegLoss(*args)(z1, z2)
    want = expected_vicreg(z1_64, z2_64, *args[:3])
    check(out, want, [z1, z2], [z1_64, z2_64], dtype)


@pytest.mark.parametrize("build,name", [
    (lambda: snn.BarlowTwinsLoss(lambda_param=-1.0), "lambda_param"),
    (lambda: snn.VICRegLoss(lambda_param=float("nan")), "lambda_param"),
    (lambda: snn.VICRegLoss(mu_param=-2.0), "mu_param"),
    (lambda: snn.VICRegLoss(nu_param=float("inf")), "nu_param")])
def test_barlow_and_vicreg_modules_check_their_weights_by_their_own_names(build, name):
    # At construction, named as the module's argument (the functional op calls them lambda_offdiag, sim/var/cov_weight).
    with pytest.raises(ValueError, match=f"^{name} "):
        build()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dino_loss_official_signature(dtype):
    """DINOLoss(out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
    student_temp, center_momentum): the loss with the centre before the step, then the centre update."""
    p, b, ncrops = 11, 5, 6
    loss = snn.DINOLoss(p, ncrops, 0.04, 0.07, 3, 10, student_temp=0.1, center_momentum=0.9)
    schedule = torch.cat([torch.linspace(0.04, 0.07, 3, dtype=F64), torch.full((7,), 0.07, dtype=F64)])
    center = torch.zeros(1, p, dtype=F64)
    for epoch in (0, 1, 2, 5):
        s, s64 = leaves(torch.randn(ncrops * b, p, dtype=F64), dtype)
        t = torch.randn(2 * b, p, dtype=F64).to(dtype)
        out = loss(s, t, epoch)
        want = expected_dino(s64, t.double(), center, 0.1, float(schedule[epoch]), 2)
        check(out, want, [s], [s64], dtype)
        center = 0.9 * center + 0.1 * t.double().mean(dim=0, keepdim=True)
        assert_close(loss.center, center, F32, name=f"center after epoch {epoch}")


@pytest.mark.parametrize("positional", [False, True])
def test_dino_loss_lightly_signature(positional):
    """lightly: DINOLoss(output_dim, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, student_temp,
    center_momentum, center_mode); forward(teacher_out list, student_out list, teacher_temp=None, epoch=None)."""
    p, b = 9, 3
    args = (p, 0.04, 0.07, 3, 0.2, 0.8)
    loss = snn.DINOLoss(*args) if positional else snn.DINOLoss(
        output_dim=p, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3, student_temp=0.2,
        center_momentum=0.8)
    assert loss.center.shape == (1, 1, p)  # lightly's buffer shape (state dicts load either way)
    schedule = torch.linspace(0.04, 0.07, 3, dtype=F64).tolist()
    center = torch.zeros(1, p, dtype=F64)
    for kw, temp in (({"epoch": 1}, schedule[1]), ({"epoch": 7}, 0.07), ({}, 0.07), ({"teacher_temp": 0.05}, 0.05)):
        teacher = [torch.randn(b, p, dtype=F64) for _ in range(2)]
        student = [torch.randn(b, p, dtype=F64).requires_grad_() for _ in range(4)]
        out = loss(teacher, student, **kw)
        s64 = [x.detach().clone().requires_grad_() for x in student]
        want = expected_dino(torch.cat(s64), torch.cat(teacher), center, 0.2, temp, 2)
        check(out, want, student, s64, F64)
        center = 0.8 * center + 0.2 * torch.cat(teacher).mean(dim=0, keepdim=True)
        assert_close(loss.center.reshape(1, p), center, F32)


def test_dino_loss_async_center_matches_sync():
    p, b, ncrops = 7, 2, 4
    sync = snn.DINOLoss(p, ncrops, 0.04, 0.04, 0, 5)
    lazy = snn.DINOLoss(p, ncrops, 0.04, 0.04, 0, 5, async_center=True)
    for epoch in range(3):
        s, t = torch.randn(ncrops * b, p), torch.randn(2 * b, p)
        assert_close(lazy(s, t, epoch), sync(s, t, epoch).double(), F32)
    lazy.apply_center_update()
    assert_close(lazy.center, sync.center.double(), F32)


def test_dino_loss_official_form_with_numpy_numbers_and_lightly_names():
    # DINO's own code passes Python ints; a numpy one (from a config or an arange) is the same signature.
    np = pytest.importorskip("numpy")
    official = snn.DINOLoss(6, np.int64(4), 0.04, 0.07, 3, np.int64(5))
    assert official.ncrops == 4 and official.center.shape == (1, 6) and official.student_temp == 0.1
    assert isinstance(official.teacher_temp_schedule, np.ndarray)  # as DINO's: numpy ops on it work
    np.testing.assert_allclose(official.teacher_temp_schedule, [0.04, 0.055, 0.07, 0.07, 0.07])
    assert len(snn.DINOLoss(6, 4, 0.04, 0.07, 3, 3).teacher_temp_schedule) == 3  # nepochs == warm-up epochs
    s, t = torch.randn(8, 6), torch.randn(4, 6)
    official(s, t, 4)
    lightly_style = snn.DINOLoss(6)
    lightly_style.update_center(teacher_out=t)  # lightly's keyword
    official.update_center(teacher_output=t)  # DINO's
    with pytest.raises(TypeError, match="teacher_out"):
        official.update_center()


def test_constructors_take_numpy_scalars():
    np = pytest.importorskip("numpy")
    q, k = F.normalize(torch.randn(6, 5), dim=1), F.normalize(torch.randn(6, 5), dim=1)
    for mod, ref in ((snn.NTXentLoss(np.float32(0.2)), snn.NTXentLoss(0.2)), (snn.DCLLoss(np.float64(0.2)), snn.DCLLoss(0.2)),
                     (snn.DCLWLoss(sigma=np.float32(0.5)), snn.DCLWLoss(sigma=0.5)),
                     (snn.NegativeCosineSimilarity(eps=np.float32(1e-8)), snn.NegativeCosineSimilarity()),
                     (snn.VICRegLoss(eps=np.float32(1e-4)), snn.VICRegLoss())):
        assert_close(mod(q, k), ref(q, k).double(), F32, name=type(mod).__name__)
    bank = snn.NTXentLoss(memory_bank_size=(np.int64(8), 5))
    assert bank.memory_bank.size == (8, 5) and all(type(v) is int for v in bank.memory_bank.size)
    assert snn.ModelEmaV3(nn.Linear(2, 2), decay=np.float32(0.5)).decay == 0.5
    assert snn.ModelEmaV3(nn.Linear(2, 2), decay=torch.tensor(0.5)).decay == 0.5


def test_dino_loss_signature_errors():
    with pytest.raises(TypeError, match="lightly"):
        snn.DINOLoss(out_dim=5)  # official form without ncrops
    with pytest.raises(ValueError, match="center_mode"):
        snn.DINOLoss(8, center_mode="median")
    with pytest.raises(ValueError, match="ncrops"):
        snn.DINOLoss(5, 3)(torch.randn(8, 5), torch.randn(4, 5))


def test_dino_loss_async_centre_is_part_of_the_modules_state():
    # A pending asynchronous centre update is applied before the centre is saved, loaded over, converted or
    # copied: a resumed / converted / copied loss continues as an uninterrupted synchronous one.
    import copy

    torch.manual_seed(0)
    p, b = 8, 4
    data = [(torch.randn(2 * b, p), torch.randn(2 * b, p) + 1) for _ in range(4)]

    def make(async_center):
        return snn.DINOLoss(p, 2, 0.04, 0.04, 0, 10, async_center=async_center)

    sync, pending = make(False), make(True)
    for s, t in data[:3]:
        sync(s, t, 0)
        pending(s, t, 0)
    assert torch.equal(pending.state_dict()["center"], sync.center), "state_dict saved the centre one update behind"
    stale = make(True)
    stale(*data[0], 0)  # an update pending ...
    stale.load_state_dict(sync.state_dict())  # ... must not land on top of the loaded centre
    assert torch.equal(stale.center, sync.center)
    twin = make(True)
    for s, t in data[:3]:
        twin(s, t, 0)
    converted = twin.double()  # the pending update must reach the converted centre, not the old tensor
    assert torch.equal(converted.center, sync.center.double())
    copied = make(True)
    for s, t in data[:3]:
        copied(s, t, 0)
    assert torch.equal(copy.deepcopy(copied).center, sync.center)


def test_ntxent_bank_sized_at_the_first_call_draws_no_global_randomness_and_follows_conversions():
    # memory_bank_size=K (the bank made at the first call): its rows come from a generator seeded at
    # construction, so the first call leaves the global RNG where it was (a resumed run's augmentations stay
    # in step), and the bank takes the dtype the module was converted to.
    torch.manual_seed(0)
    loss = snn.NTXentLoss(memory_bank_size=6).double()
    before = torch.get_rng_state()
    z0, z1 = torch.randn(4, 5, dtype=F64, requires_grad=True), torch.randn(4, 5, dtype=F64)
    after_draw = torch.get_rng_state()
    loss(z0, z1)
    assert torch.equal(torch.get_rng_state(), after_draw) and not torch.equal(before, after_draw)
    assert loss.memory_bank.bank.dtype == F64 and loss.memory_bank.bank.shape == (6, 5)
    torch.manual_seed(0)
    again = snn.NTXentLoss(memory_bank_size=6).double()
    torch.randn(8, 5)  # other randomness in between does not change the bank
    again(z0, z1)
    assert torch.equal(again.memory_bank.bank, loss.memory_bank.bank)


# ------------------------------------------------------------------ bad input, as the modules' users call them
# Each a clear ValueError / TypeError naming the argument as the module's signature spells it: no raw PyTorch /
# numpy / Python error from inside, no silently truncated or wrapped value.

def _r(*shape):
    return torch.randn(*shape)


def _ema_model():
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


@pytest.mark.parametrize("build,exc,pattern", [
    # official DINO: int() took 16.0 / "16" / 1.5 epochs, numpy raised for a negative count, the rest only failed
    # at the first forward (under the functional op's names) or never
    (lambda: snn.DINOLoss(16.0, 4), TypeError, "^out_dim must be an int"),
    (lambda: snn.DINOLoss("16", 4), TypeError, "^out_dim must be an int"),
    (lambda: snn.DINOLoss(0, 4), ValueError, "^out_dim must be"),
    (lambda: snn.DINOLoss(-5, 4), ValueError, "^out_dim must be"),
    (lambda: snn.DINOLoss(16, 0), ValueError, "^ncrops must be"),
    (lambda: snn.DINOLoss(16, 4, 0.04, 0.04, 1.5, 10), TypeError, "^warmup_teacher_temp_epochs must be an int"),
    (lambda: snn.DINOLoss(16, 4, 0.04, 0.04, -2, 10), ValueError, "^warmup_teacher_temp_epochs must be"),
    (lambda: snn.DINOLoss(16, 4, 0.04, 0.04, 0, -1), ValueError, "^nepochs must be"),
    (lambda: snn.DINOLoss(16, 4, 0.0, 0.04, 3, 10), ValueError, "^warmup_teacher_temp must be positive"),
    (lambda: snn.DINOLoss(16, 4, 0.04, -1.0, 0, 10), ValueError, "^teacher_temp must be positive"),
    (lambda: snn.DINOLoss(16, 4, 0.04, 0.04, 0, 10, 0.0), ValueError, "^student_temp must be positive"),
    (lambda: snn.DINOLoss(16, 4, center_momentum=1.5), ValueError, "^center_momentum must be in"),
    (lambda: snn.DINOLoss(16, 4, n_global_crops=0), ValueError, "^n_global_crops must be"),
    (lambda: snn.DINOLoss(16, 4, n_global_crops=5), ValueError, "n_global_crops=5 is more than ncrops=4"),
    (lambda: snn.DINOLoss(16, 4, reduction="avg"), ValueError, "^reduction must be"),
    # lightly's DINO
    (lambda: snn.DINOLoss(output_dim=-1), ValueError, "^output_dim must be"),
    (lambda: snn.DINOLoss(output_dim="a"), TypeError, "^output_dim must be an int"),
    (lambda: snn.DINOLoss(8, warmup_teacher_temp_epochs=-1), ValueError, "^warmup_teacher_temp_epochs must be"),
    (lambda: snn.DINOLoss(8, student_temp=0), ValueError, "^student_temp must be positive"),
    (lambda: snn.DINOLoss(8, center_momentum=2.0), ValueError, "^center_momentum must be in"),
    # SwaV: checked at construction by the module's names (swav_loss says epsilon / iterations)
    (lambda: snn.SwaVLoss(temperature=0), ValueError, "^temperature must be positive"),
    (lambda: snn.SwaVLoss(sinkhorn_epsilon=0), ValueError, "^sinkhorn_epsilon must be positive"),
    (lambda: snn.SwaVLoss(sinkhorn_iterations=1.5), TypeError, "^sinkhorn_iterations must be an int"),
    (lambda: snn.SwaVLoss(sinkhorn_iterations=-1), ValueError, "^sinkhorn_iterations must be"),
    # VICReg: an infinite eps silently zeroed the variance term
    (lambda: snn.VICRegLoss(eps=float("inf")), ValueError, "^eps must be"),
    # a bank size that is not an int or a tuple: Python's "'float' object is not iterable"
    (lambda: snn.MemoryBankModule(4.0), TypeError, "^size must be"),
    (lambda: snn.NTXentLoss(memory_bank_size=None), TypeError, "^size must be"),
    (lambda: snn.NTXentLoss(float("inf")), ValueError, "^temperature must be positive and finite"),
    # timm's ModelEmaV3: a string compared with '>' raised Python's own TypeError; a non-positive power silently
    # gave a decay that shrinks as the steps go by (clamped to min_decay)
    (lambda: snn.ModelEmaV3(_ema_model(), warmup_gamma="a"), TypeError, "^warmup_gamma must be a float"),
    (lambda: snn.ModelEmaV3(_ema_model(), warmup_power=-1.0), ValueError, "^warmup_power must be positive"),
    (lambda: snn.ModelEmaV3(_ema_model(), warmup_power="a"), TypeError, "^warmup_power must be a float"),
])
def test_module_constructors_refuse_bad_arguments_by_name(build, exc, pattern):
    with pytest.raises(exc, match=pattern):
        build()


def test_dino_official_forward_refuses_what_the_schedule_lookup_truncated_or_wrapped():
    loss = snn.DINOLoss(16, 4, 0.04, 0.07, 3, 10)
    s, t = _r(16, 16), _r(8, 16)
    for epoch, exc in ((-1, ValueError), (1.7, TypeError), ("1", TypeError)):  # were _temps[-1], _temps[1], _temps[1]
        with pytest.raises(exc, match="^epoch must be"):
            loss(s, t, epoch)
    loss(s, t, torch.tensor(1))  # a 0-d integer tensor is an int epoch
    with pytest.raises(TypeError, match="^teacher_output must be a torch.Tensor"):  # was AttributeError: .shape
        loss(s, [t[:4], t[4:]], 0)
    with pytest.raises(TypeError, match="^student_output must be a torch.Tensor"):
        loss("x", t, 0)
    with pytest.raises(ValueError, match="^teacher_output has 1 rows, not a multiple of n_global_crops=2"):
        loss(_r(4, 16), _r(1, 16), 0)  # was "... crops of the batch size 0 make 0"
    with pytest.raises(ValueError, match=r"^teacher_output has 8 columns but the centre has 16 \(out_dim\)"):
        loss(_r(16, 8), _r(8, 8), 0)  # was "center must have shape [1, 8]": an argument the user never passed


def test_dino_lightly_forward_and_update_center_refuse_a_wrong_width_or_epoch():
    loss = snn.DINOLoss(output_dim=16, warmup_teacher_temp_epochs=3)
    with pytest.raises(ValueError, match="^epoch must be >= 0"):  # lightly's schedule[-1]: the last warm-up value
        loss([_r(4, 16)], [_r(4, 16)] * 2, epoch=-1)
    with pytest.raises(TypeError, match="^epoch must be an int"):  # was "list indices must be integers"
        loss([_r(4, 16)], [_r(4, 16)] * 2, epoch=1.5)
    for teacher in (_r(4, 8), _r(4, 8).requires_grad_()):  # the teacher-gradient path broadcast into a raw error
        with pytest.raises(ValueError, match=r"^teacher_out\[0\] has 8 columns but the centre has 16"):
            loss([teacher], [_r(4, 8)] * 2)
    center = loss.center.clone()
    # reshape(-1, 16) silently made [4, 8] into 2 rows and [4, 32] into 8 rows of the centre's width
    for bad in (_r(4, 8), _r(4, 32)):
        with pytest.raises(ValueError, match=r"^teacher_out must be \(\.\.\., 16\)"):
            loss.update_center(teacher_out=bad)
        with pytest.raises(ValueError, match=r"^teacher_output must be \(\.\.\., 16\)"):
            loss.update_center(bad)
    assert torch.equal(loss.center, center)
    loss.update_center(teacher_out=_r(2, 4, 16))  # lightly's (crops, batch, dim) stack still works


@pytest.mark.parametrize("call,exc,pattern", [
    # lightly's argument names, not the functional op's z1 / z2
    (lambda: snn.NTXentLoss()(_r(4, 8), _r(5, 8)), ValueError, "^out1 has 5 rows but out0 has 4"),
    (lambda: snn.NTXentLoss()(_r(4, 8), _r(4, 9)), ValueError, "^out1 has feature dimension 9 but out0 has 8"),
    (lambda: snn.NTXentLoss()(_r(4, 8), _r(4, 8).double()), TypeError, "^out1 has dtype torch.float64"),
    (lambda: snn.DCLLoss()(_r(4, 8), _r(5, 8)), ValueError, "^out1 has 5 rows but out0 has 4"),
    (lambda: snn.NTXentLoss(memory_bank_size=(16, 8))(_r(4, 6), _r(4, 6)), ValueError,
     r"^out1 has dimension 6 but the memory bank holds rows of dimension 8 \(memory_bank_size=\(16, 8\)\)"),
    (lambda: snn.BarlowTwinsLoss()(_r(4, 8), _r(5, 8)), ValueError, "^z_b has 5 rows but z_a has 4"),
    (lambda: snn.BarlowTwinsLoss()(torch.ones(4, 8, dtype=torch.long), _r(4, 8)), TypeError, "^z_a must be a floating"),
    (lambda: snn.BarlowTwinsLoss()(_r(1, 8), _r(1, 8)), ValueError, "^z_a and z_b need at least 2 rows"),
    (lambda: snn.VICRegLoss()(torch.ones(4, 8, dtype=torch.long), torch.ones(4, 8, dtype=torch.long)), TypeError,
     "^z_a must be a floating"),
    (lambda: snn.VICRegLoss()(_r(4, 8), _r(4, 8).double()), TypeError, "^z_b has dtype torch.float64 but z_a"),
    (lambda: snn.VICRegLoss()(_r(4, 0, 8), _r(4, 0, 8)), ValueError, "hold no elements"),  # was ZeroDivisionError
    (lambda: snn.VICRegLoss()(_r(4, 3, 0), _r(4, 3, 0)), ValueError, "hold no elements"),  # was a reshape error
    (lambda: snn.NegativeCosineSimilarity(dim=0)(torch.tensor(1.0), torch.tensor(2.0)), ValueError, "0-d"),  # IndexError
    (lambda: snn.NegativeCosineSimilarity()(_r(4, 0), _r(4, 0)), ValueError, "hold no elements"),  # reshape error
    (lambda: snn.NegativeCosineSimilarity()(_r(0, 8), _r(0, 8)), ValueError, "^x0 and x1 .* hold no elements"),
    (lambda: snn.NegativeCosineSimilarity()(_r(4, 8), torch.ones(4, 8, dtype=torch.long)), TypeError,
     "^x1 must be a floating"),  # was "z must be ..."
    # weight_fn returning the wrong number of weights: torch.broadcast_shapes' own RuntimeError
    (lambda: snn.DCLLoss(weight_fn=lambda a, b: torch.ones(3))(_r(4, 8), _r(4, 8)), ValueError,
     r"^weight_fn returned weights of shape \(3,\)"),
    (lambda: snn.DCLLoss(weight_fn=lambda a, b: "w")(_r(4, 8), _r(4, 8)), TypeError, "^weight_fn must return"),
])
def test_module_forwards_name_the_arguments_as_their_signature_does(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_openclip_losses_check_the_features_on_the_subclass_hook_path_too():
    class Clip(snn.ClipLoss):
        def get_ground_truth(self, device, num_logits):
            return super().get_ground_truth(device, num_logits)

    class SigLip(snn.SigLipLoss):
        def get_logits(self, *args, **kwargs):
            return super().get_logits(*args, **kwargs)

    with pytest.raises(ValueError, match="^text_features has feature dimension 6 but image_features has 8"):
        Clip()(_r(4, 8), _r(4, 6), 10.0)  # was "mat1 and mat2 shapes cannot be multiplied"
    with pytest.raises(ValueError, match="^text_features has 5 rows but image_features has 4"):
        SigLip()(_r(4, 8), _r(5, 8), 10.0, -10.0)


def test_clip_loss_with_a_nan_float_bias_is_nan_as_openclips():
    # OpenCLIP adds logit_bias to every logit; the bias-free fused loss dropped a float NaN (a tensor one gave NaN).
    img, txt = F.normalize(_r(4, 8), dim=1), F.normalize(_r(4, 8), dim=1)
    assert torch.isnan(snn.ClipLoss()(img, txt, 10.0, float("nan")))
    assert torch.isnan(snn.ClipLoss()(img, txt, 10.0, torch.tensor(float("nan"))))
    assert torch.isfinite(snn.ClipLoss()(img, txt, 10.0, -3.0))


def test_model_ema_update_and_set_refuse_a_non_module():
    ema = snn.ModelEmaV3(_ema_model())
    for method in (ema.update, ema.set):
        with pytest.raises(TypeError, match="^model must be an nn.Module"):  # was AttributeError: .state_dict
            method("model")
    with pytest.raises(TypeError, match="^step must be an int"):
        ema.update(_ema_model(), step="3")
    ema.update(_ema_model(), step=torch.tensor(3))  # timm's get_decay takes a tensor step too
