"""sslkernels' lightly drop-ins against lightly itself (written for lightly 1.6.0).

Every test builds lightly's object and ours with the same arguments, feeds both the same inputs (three
random sets per drop-in: a fresh seed each, odd sizes), and asks for the same loss and the same gradient
of every input, within a relative 1e-5 in float32 (relative to the largest magnitude of lightly's value;
NaN or Inf never pass), plus the same state after the step where there is state (memory bank contents and
pointer, DINO centre, EMA weights). Then patch() / unpatch().
"""
import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

lightly = pytest.importorskip("lightly", reason="the lightly drop-ins are compared with lightly itself")

import lightly.loss as L  # noqa: E402
import lightly.loss.dcl_loss as lightly_dcl  # noqa: E402
import lightly.models.modules.memory_bank as lightly_bank  # noqa: E402
import lightly.models.utils as lightly_utils  # noqa: E402

import sslkernels  # noqa: E402
import sslkernels.integrations.lightly as sk_lightly  # noqa: E402
from conftest import DEVICES, assert_close  # noqa: E402
from sslkernels import nn as snn  # noqa: E402
from sslkernels.backends import triton_available, triton_interpreted  # noqa: E402

RTOL = 1e-5
SETS = [0, 1, 2]  # three input sets per drop-in; conftest seeds each test id differently


@pytest.fixture(params=["auto", "triton"])
def backend(request):
    """Every comparison twice: the default path for the device, and the Triton kernels (under the
    interpreter on a machine without a GPU), set process-wide so that every op inside a drop-in uses it."""
    device = request.node.callspec.params.get("device", "cpu")
    if request.param == "triton" and not (triton_available() and (device == "cuda" or triton_interpreted())):
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1 for CPU tensors")
    sslkernels.set_backend(request.param)
    yield request.param
    sslkernels.set_backend(None)


def close(ours, theirs, name):
    """Same shape and dtype, and within RTOL of lightly's largest magnitude (assert_close rejects NaN/Inf)."""
    assert isinstance(ours, torch.Tensor), f"{name}: sslkernels gave {type(ours).__name__}"
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} != lightly's {tuple(theirs.shape)}"
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype} != lightly's {theirs.dtype}"
    assert_close(ours, theirs, rtol=RTOL, atol=0.0, name=name)


def twins(*tensors, grad=True):
    """Two sets of leaves holding the same values: one for sslkernels, one for lightly."""
    ours = [t.detach().clone().requires_grad_(grad) for t in tensors]
    theirs = [t.detach().clone().requires_grad_(grad) for t in tensors]
    return ours, theirs


def same_step(loss_ours, loss_theirs, leaves_ours, leaves_theirs, what):
    """Loss values, then the gradient of every leaf (None on one side only is a failure)."""
    close(loss_ours, loss_theirs, f"{what}: loss")
    g_ours = torch.autograd.grad(loss_ours.sum(), leaves_ours, allow_unused=True)
    g_theirs = torch.autograd.grad(loss_theirs.sum(), leaves_theirs, allow_unused=True)
    for i, (a, b) in enumerate(zip(g_ours, g_theirs)):
        assert (a is None) == (b is None), f"{what}: input {i} has a gradient on one side only"
        if b is not None:
            close(a, b, f"{what}: gradient of input {i}")


# ------------------------------------------------------------------------------------ contrastive


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", SETS)
def test_lightly_NTXentLoss_matches(case, device, backend):
    n, d, tau, args = [(5, 7, 0.5, ()), (11, 3, 0.07, (0.07, 0, False)), (17, 33, 0.2, (0.2,))][case]
    x0, x1 = torch.randn(n, d, device=device) * 3, torch.randn(n, d, device=device)
    ours_in, theirs_in = twins(x0, x1)
    same_step(snn.NTXentLoss(*args)(*ours_in), L.NTXentLoss(*args)(*theirs_in), ours_in, theirs_in, "NTXentLoss")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", SETS)
def test_lightly_NTXentLoss_memory_bank_matches(case, device, backend):
    """lightly's MoCo mode over several steps: the bank starts as random unit rows (the same ones: both draw
    them from the global RNG at construction), out0 is contrasted with out1 and the bank from before the
    step, normalized out1 goes in afterwards and a batch reaching the end of the bank is cut there. Batch
    sizes that do not divide the bank size, a batch larger than the bank, a step without gradient."""
    k, d, tau = [(13, 7, 0.1), (10, 5, 0.5), (29, 16, 0.07)][case]
    sizes = [(5, 4, 6, 3, 7, 2), (3, 11, 4, 4), (8, 8, 9, 30, 5)][case]
    size = [(k, d), [k, d], (k, d)][case]
    seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(seed)
    theirs = L.NTXentLoss(tau, size, gather_distributed=False).to(device)
    torch.manual_seed(seed)
    ours = snn.NTXentLoss(tau, size, gather_distributed=False).to(device)
    close(ours.memory_bank.bank, theirs.memory_bank.bank, "bank at construction")
    for step, b in enumerate(sizes):
        x0, x1 = torch.randn(b, d, device=device), torch.randn(b, d, device=device) * 2
        ours_in, theirs_in = twins(x0, x1)
        same_step(ours(*ours_in), theirs(*theirs_in), ours_in, theirs_in, f"step {step}")
        close(ours.memory_bank.bank, theirs.memory_bank.bank, f"bank after step {step}")
        assert torch.equal(ours.memory_bank.bank_ptr, theirs.memory_bank.bank_ptr), f"pointer after step {step}"
    # out0 without gradient (an evaluation pass): the bank is read, not written.
    x0, x1 = torch.randn(4, d, device=device), torch.randn(4, d, device=device)
    close(ours(x0, x1), theirs(x0, x1), "loss without gradient")
    close(ours.memory_bank.bank, theirs.memory_bank.bank, "bank after a step without gradient")
    assert ours.state_dict().keys() == theirs.state_dict().keys()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", SETS)
def test_lightly_MemoryBankModule_matches(case, device, backend):
    """forward(output, labels=None, update=False) -> (output, bank before the update); lightly's write rule
    (cut at the end, pointer back to 0) from the random start until every row has been replaced."""
    k, d, first = [(11, 5, True), (7, 3, False), (16, 9, True)][case]
    sizes = [(4, 4, 6, 2, 13, 3), (2, 5, 1, 7), (5, 5, 5, 5, 5)][case]
    seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(seed)
    theirs = lightly_bank.MemoryBankModule((k, d), gather_distributed=False, feature_dim_first=first).to(device)
    torch.manual_seed(seed)
    ours = snn.MemoryBankModule((k, d), gather_distributed=False, feature_dim_first=first).to(device)
    for step, b in enumerate(sizes):
        x = torch.randn(b, d, device=device)
        update = step != 1  # one read-only step
        out_o, bank_o = ours(x, update=update)
        out_t, bank_t = theirs(x, None, update)
        assert out_o is x and out_t is x
        close(bank_o, bank_t, f"returned bank, step {step}")
        close(ours.bank, theirs.bank, f"bank after step {step}")
        assert torch.equal(ours.bank_ptr, theirs.bank_ptr), f"pointer after step {step}"
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert ours.size == theirs.size
    # size 0: no bank.
    x = torch.randn(3, d, device=device)
    assert snn.MemoryBankModule(0)(x, update=True) == (x, None) == lightly_bank.MemoryBankModule(0)(x, update=True)


@pytest.mark.parametrize("size", [5, -1, (3, 4, 5), (-2, 4)])
def test_lightly_MemoryBankModule_rejects_what_lightly_rejects(size):
    with pytest.raises(ValueError):
        lightly_bank.MemoryBankModule(size)
    with pytest.raises(ValueError, match="(?i)memory bank size"):
        snn.MemoryBankModule(size)


def _lightly_doc_weight(out0, out1):
    # The custom weight_fn of lightly's DCLLoss docstring: it carries a gradient into both inputs.
    return torch.sum((out0 - out1) ** 2, dim=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", SETS)
def test_lightly_DCLLoss_matches(case, device, backend):
    n, d, args = [(5, 7, ()), (13, 3, (0.5, None, False)), (9, 33, (0.2, _lightly_doc_weight))][case]
    x0, x1 = torch.randn(n, d, device=device), torch.randn(n, d, device=device) + 0.5
    ours_in, theirs_in = twins(x0, x1)
    same_step(snn.DCLLoss(*args)(*ours_in), L.DCLLoss(*args)(*theirs_in), ours_in, theirs_in, "DCLLoss")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", SETS)
def test_lightly_DCLWLoss_matches(case, device, backend):
    """DCL with lightly's negative von Mises-Fisher weights (detached; they differ per row)."""
    n, d, kwargs = [(5, 7, {}), (13, 3, {"temperature": 0.5, "sigma": 0.2}), (31, 17, {"sigma": 1.5})][case]
    x0 = torch.randn(n, d, device=device)
    x1 = x0 + torch.randn(n, d, device=device) * torch.rand(n, 1, device=device)  # varied positive similarity
    ours_in, theirs_in = twins(x0, x1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # lightly's torch.tensor(tensor) copy warning
        theirs = L.DCLWLoss(**kwargs)(*theirs_in)
        w_theirs = lightly_dcl.negative_mises_fisher_weights(x0, x1, kwargs.get("sigma", 0.5))
    same_step(snn.DCLWLoss(**kwargs)(*ours_in), theirs, ours_in, theirs_in, "DCLWLoss")
    w_ours = snn.negative_mises_fisher_weights(x0, x1, kwargs.get("sigma", 0.5))
    close(w_ours, w_theirs, "negative_mises_fisher_weights")
    assert w_theirs.std() > 0.01  # the weights matter in this case
    assert not w_ours.requires_grad


# -------------------------------------------------------------------------------- non-contrastive


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", SETS)
def test_lightly_NegativeCosineSimilarity_matches(case, device, backend):
    """lightly's has no stop-gradient: both inputs get their gradient. Any dim, broadcasting, eps."""
    shape0, shape1, kwargs = [((7, 5), (7, 5), {}),
                              ((3, 5, 9), (3, 1, 9), {"dim": 2}),  # broadcast over the middle dimension
                              ((6, 11), (6, 11), {"dim": 0, "eps": 1e-3})][case]
    x0, x1 = torch.randn(shape0, device=device), torch.randn(shape1, device=device)
    if case == 2:
        x0[:, 0] *= 1e-5  # a column whose norm falls under eps: the clamp is active
    ours_in, theirs_in = twins(x0, x1)
    same_step(snn.NegativeCosineSimilarity(**kwargs)(*ours_in), L.NegativeCosineSimilarity(**kwargs)(*theirs_in),
              ours_in, theirs_in, "NegativeCosineSimilarity")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", SETS)
def test_lightly_DINOLoss_matches(case, device, backend):
    """Several steps of one loss object: the teacher temperature's warm-up by epoch (inside, at the end of,
    after the warm-up), an explicit teacher_temp, none; the centre after every step; multi-crop students."""
    b, p, n_teacher, n_student = [(5, 7, 2, 6), (3, 33, 2, 2), (4, 9, 3, 2)][case]
    kwargs = dict(output_dim=p, warmup_teacher_temp=0.02, teacher_temp=0.07, warmup_teacher_temp_epochs=3,
                  student_temp=0.1, center_momentum=0.8)
    ours, theirs = snn.DINOLoss(**kwargs).to(device), L.DINOLoss(**kwargs).to(device)
    close(ours.teacher_temp_schedule, theirs.teacher_temp_schedule, "teacher_temp_schedule")
    for step, fw in enumerate([{"epoch": 0}, {"epoch": 2}, {"epoch": 3}, {"epoch": 40}, {}, {"teacher_temp": 0.05}]):
        teacher = [torch.randn(b, p, device=device) * 2 + 1 for _ in range(n_teacher)]
        student = [torch.randn(b, p, device=device) * 3 for _ in range(n_student)]
        ours_s, theirs_s = twins(*student)
        same_step(ours(teacher, ours_s, **fw), theirs(teacher, theirs_s, **fw), ours_s, theirs_s, f"step {step}")
        close(ours.center, theirs.center, f"center after step {step}")


@pytest.mark.parametrize("device", DEVICES)
def test_lightly_DINOLoss_teacher_gradient_matches(device, backend):
    """lightly does not detach the teacher: a teacher output that requires grad gets a gradient."""
    ours, theirs = snn.DINOLoss(11, warmup_teacher_temp_epochs=2), L.DINOLoss(11, warmup_teacher_temp_epochs=2)
    ours, theirs = ours.to(device), theirs.to(device)
    for epoch in (0, 5):
        teacher = [torch.randn(5, 11, device=device) for _ in range(2)]
        student = [torch.randn(5, 11, device=device) * 2 for _ in range(3)]
        ours_in, theirs_in = twins(*teacher, *student)
        loss_o = ours(ours_in[:2], ours_in[2:], epoch=epoch)
        loss_t = theirs(theirs_in[:2], theirs_in[2:], epoch=epoch)
        same_step(loss_o, loss_t, ours_in, theirs_in, f"epoch {epoch}")
        close(ours.center, theirs.center, f"center after epoch {epoch}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lightly_DINOLoss_teacher_gradient_in_half_precision(dtype, backend):
    """Half-precision outputs with a teacher that requires grad (outside autocast): lightly's einsum gets an fp32
    teacher (promoted by its fp32 centre) and a half student and raises; ours computes in fp32, and matches
    lightly run on the same values in fp32."""
    ours, theirs = snn.DINOLoss(11, warmup_teacher_temp_epochs=2), L.DINOLoss(11, warmup_teacher_temp_epochs=2)
    teacher = [torch.randn(5, 11).to(dtype) for _ in range(2)]
    student = [(torch.randn(5, 11) * 2).to(dtype) for _ in range(3)]
    ours_in, _ = twins(*teacher, *student)
    theirs_in, _ = twins(*(x.float() for x in teacher + student))
    loss_o = ours(ours_in[:2], ours_in[2:], epoch=1)
    loss_t = theirs(theirs_in[:2], theirs_in[2:], epoch=1)
    assert loss_o.dtype == torch.float32
    assert_close(loss_o, loss_t, rtol=1e-5, atol=0.0, name="loss")
    g_o = torch.autograd.grad(loss_o, ours_in)
    g_t = torch.autograd.grad(loss_t, theirs_in)
    for i, (a, b) in enumerate(zip(g_o, g_t)):
        assert a.dtype == dtype
        assert_close(a, b, dtype, name=f"gradient of input {i}")


def _prototype_scores(b, p, device):
    # SwaV's inputs: cosine similarities of normalized features with normalized prototypes.
    return F.normalize(torch.randn(b, 6, device=device), dim=1) @ F.normalize(torch.randn(p, 6, device=device), dim=1).T


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", SETS)
def test_lightly_SwaVLoss_matches(case, device, backend):
    """Codes from Sinkhorn on each high-resolution crop (with its queue rows when given), predicted by every
    other crop; gradients into every crop's scores."""
    b, p, n_high, n_low, n_queue, kwargs = [
        (7, 5, 2, 0, 0, {}),
        (5, 11, 2, 3, 0, {"temperature": 0.2, "sinkhorn_iterations": 5, "sinkhorn_epsilon": 0.1}),
        (9, 13, 3, 1, 17, {"sinkhorn_gather_distributed": False}),
    ][case]
    crops = [_prototype_scores(b, p, device) for _ in range(n_high + n_low)]
    queue = [_prototype_scores(n_queue, p, device) for _ in range(n_high)] if n_queue else None
    ours_in, theirs_in = twins(*crops)
    loss_o = snn.SwaVLoss(**kwargs)(ours_in[:n_high], ours_in[n_high:], queue_outputs=queue)
    loss_t = L.SwaVLoss(**kwargs)(theirs_in[:n_high], theirs_in[n_high:], queue_outputs=queue)
    same_step(loss_o, loss_t, ours_in, theirs_in, "SwaVLoss")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", SETS)
def test_lightly_BarlowTwinsLoss_matches(case, device, backend):
    """Each view batch-normalized on its own (F.batch_norm, ε = 1e-5); gather_distributed on one process."""
    n, d, args = [(5, 7, ()), (13, 3, (0.02,)), (9, 33, (5e-3, True))][case]
    z_a = torch.randn(n, d, device=device) * torch.linspace(0.5, 3.0, d, device=device) + 2
    z_b = z_a * 0.7 + torch.randn(n, d, device=device)
    ours_in, theirs_in = twins(z_a, z_b)
    same_step(snn.BarlowTwinsLoss(*args)(*ours_in), L.BarlowTwinsLoss(*args)(*theirs_in), ours_in, theirs_in,
              "BarlowTwinsLoss")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", SETS)
def test_lightly_VICRegLoss_matches(case, device, backend):
    """2-d inputs; (batch, positions, dim) inputs (lightly's VICRegL-style form); a non-default eps with
    gather_distributed on one process. Features with small spread so the variance hinge is active."""
    shape, kwargs = [((5, 7), {}),
                     ((6, 4, 5), {"lambda_param": 10.0, "mu_param": 20.0, "nu_param": 2.0}),
                     ((9, 33), {"eps": 1e-3, "gather_distributed": True})][case]
    scale = torch.linspace(0.2, 2.0, shape[-1], device=device)
    z_a = torch.randn(shape, device=device) * scale
    z_b = z_a + torch.randn(shape, device=device) * 0.5
    ours_in, theirs_in = twins(z_a, z_b)
    same_step(snn.VICRegLoss(**kwargs)(*ours_in), L.VICRegLoss(**kwargs)(*theirs_in), ours_in, theirs_in,
              "VICRegLoss")


# ------------------------------------------------------------------------------------------ state


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", SETS)
def test_lightly_update_momentum_matches(case, device, backend):
    """ema ← m·ema + (1 − m)·model on parameters only: BatchNorm running statistics stay as they were."""
    d = [7, 3, 33][case]
    model = nn.Sequential(nn.Linear(d, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).to(device)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for prm in ema.parameters():
            prm.add_(torch.randn_like(prm))
    model(torch.randn(8, d, device=device))  # moves the model's running statistics away from the EMA copy's
    ema_theirs = copy.deepcopy(ema)
    for m in (0.9, 0.996, 0.5):
        with torch.no_grad():
            for prm in model.parameters():
                prm.add_(torch.randn_like(prm) * 0.1)
        sk_lightly.update_momentum(model, ema, m)
        lightly_utils.update_momentum(model, ema_theirs, m)
        for (name, a), b in zip(ema.state_dict().items(), ema_theirs.state_dict().values()):
            if a.is_floating_point():
                close(a, b, f"{name} after m={m}")
            else:
                assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------- bad arguments


def test_lightly_dropins_reject_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        snn.NTXentLoss(temperature=-0.5)
    with pytest.raises(ValueError, match="temperature"):
        snn.DCLLoss(temperature=0.0)
    with pytest.raises(TypeError, match="weight_fn"):
        snn.DCLLoss(weight_fn=3)
    with pytest.raises(ValueError, match="weight_fn"):
        snn.DCLLoss(weight_fn=lambda a, b: torch.ones(3, 1))(torch.randn(4, 5), torch.randn(4, 5))
    with pytest.raises(ValueError, match="sigma"):
        snn.DCLWLoss(sigma=0)
    with pytest.raises(ValueError, match="dimension"):
        snn.NTXentLoss(memory_bank_size=(8, 3))(torch.randn(4, 5, requires_grad=True), torch.randn(4, 5))
    with pytest.raises(ValueError, match="eps"):
        snn.NegativeCosineSimilarity(eps=-1.0)
    with pytest.raises(ValueError, match="dim"):
        snn.NegativeCosineSimilarity(dim=2)(torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="broadcast"):
        snn.NegativeCosineSimilarity()(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="student_out"):
        snn.DINOLoss(5)([torch.randn(3, 5)] * 2, [torch.randn(3, 5), torch.randn(2, 5)])
    with pytest.raises(ValueError, match="eps"):
        snn.VICRegLoss(eps=-1e-4)
    with pytest.raises(ValueError, match="same shape"):
        snn.VICRegLoss()(torch.randn(4, 5), torch.randn(4, 6))


# ------------------------------------------------------------------------------- patch / unpatch

_LOSSES = ["NTXentLoss", "DCLLoss", "DCLWLoss", "NegativeCosineSimilarity", "DINOLoss", "SwaVLoss",
           "BarlowTwinsLoss", "VICRegLoss"]


def test_lightly_patch_unpatch():
    import lightly.loss.memory_bank as lightly_loss_bank
    import lightly.loss.ntx_ent_loss as lightly_ntx

    originals = {name: getattr(L, name) for name in _LOSSES}
    orig_update, orig_bank, orig_weights = (lightly_utils.update_momentum, lightly_bank.MemoryBankModule,
                                            lightly_dcl.negative_mises_fisher_weights)
    x0, x1 = torch.randn(7, 5), torch.randn(7, 5)
    try:
        patched = sk_lightly.patch()
        assert "lightly.models.utils.update_momentum" in patched and sk_lightly.is_patched()
        for name in _LOSSES:
            assert getattr(L, name) is getattr(snn, name), name
        assert lightly_ntx.NTXentLoss is snn.NTXentLoss and lightly_ntx.MemoryBankModule is snn.MemoryBankModule
        assert lightly_bank.MemoryBankModule is snn.MemoryBankModule
        assert lightly_loss_bank.MemoryBankModule is snn.MemoryBankModule
        assert lightly_utils.update_momentum is sk_lightly.update_momentum
        assert lightly_dcl.negative_mises_fisher_weights is snn.negative_mises_fisher_weights
        # lightly's BarlowTwinsLoss calls super(BarlowTwinsLoss, self): its own module keeps lightly's class,
        # so the class (and subclasses of it, used below through originals[...]) still works while patched.
        import lightly.loss.barlow_twins_loss as lightly_bt
        assert lightly_bt.BarlowTwinsLoss is originals["BarlowTwinsLoss"]
        assert "lightly.loss.barlow_twins_loss.BarlowTwinsLoss" not in patched
        assert sk_lightly.patch() == []  # idempotent: nothing new, the originals kept
        from lightly.loss import NTXentLoss  # a lookup after patch() gets ours
        assert NTXentLoss is snn.NTXentLoss
        # lightly's API after patch() gives lightly's numbers.
        for name, args in (("NTXentLoss", (0.3,)), ("DCLWLoss", ()), ("BarlowTwinsLoss", ()), ("VICRegLoss", ()),
                           ("NegativeCosineSimilarity", ())):
            ours_in, theirs_in = twins(x0, x1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                want = originals[name](*args)(*theirs_in)
            same_step(getattr(lightly.loss, name)(*args)(*ours_in), want, ours_in, theirs_in, f"patched {name}")
        loss = lightly.loss.NTXentLoss(memory_bank_size=(9, 5))
        assert isinstance(loss.memory_bank, snn.MemoryBankModule)
        model, ema = nn.Linear(5, 3), nn.Linear(5, 3)
        ema_theirs = copy.deepcopy(ema)
        lightly.models.utils.update_momentum(model, ema, 0.9)
        orig_update(model, ema_theirs, 0.9)
        close(ema.weight, ema_theirs.weight, "update_momentum through lightly.models.utils")
    finally:
        restored = sk_lightly.unpatch()
    assert sorted(restored) == sorted(patched)
    for name in _LOSSES:
        assert getattr(L, name) is originals[name], name
    assert lightly_ntx.NTXentLoss is originals["NTXentLoss"]
    assert lightly_utils.update_momentum is orig_update and lightly_bank.MemoryBankModule is orig_bank
    assert lightly_loss_bank.MemoryBankModule is orig_bank and lightly_ntx.MemoryBankModule is orig_bank
    assert lightly_dcl.negative_mises_fisher_weights is orig_weights
    assert sk_lightly.unpatch() == [] and not sk_lightly.is_patched()


def test_lightly_patch_parts():
    try:
        patched = sk_lightly.patch(losses=False, memory_bank=False)
        assert patched == ["lightly.models.utils.update_momentum"]
        assert L.NTXentLoss is not snn.NTXentLoss
        with pytest.raises(TypeError, match="losses"):
            sk_lightly.patch(losses="yes")
    finally:
        sk_lightly.unpatch()
    assert lightly_utils.update_momentum is not sk_lightly.update_momentum


def test_import_sslkernels_does_not_import_lightly():
    code = ("import sys, sslkernels, sslkernels.nn, sslkernels.integrations.lightly; "
            "assert 'lightly' not in sys.modules, 'lightly was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lightly_update_momentum_errors_use_lightlys_names():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"^m must be in \[0, 1\]"):  # lightly runs with m = 1.5
        sk_lightly.update_momentum(a, b, 1.5)
    with pytest.raises(ValueError, match="^model_ema has 4 parameters but model has 2"):
        sk_lightly.update_momentum(a, nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), 0.9)
    with pytest.raises(ValueError, match="target: model_ema's parameters, source: model's"):
        sk_lightly.update_momentum(a, nn.Linear(4, 5), 0.9)
