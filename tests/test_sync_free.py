"""A full MoCo v2 step (two encoder forwards, moco_loss against the queue, backward, SGD, EMA of the key
encoder, enqueue) must never bring a tensor's value to the host: that is what lets it run without
device synchronizations and be captured in a CUDA graph. The same for every loss, module, EMA state op and
reference trainer step below, under conftest.host_syncs (host reads, host <-> device copies, data-dependent
shapes, synchronize calls)."""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import sslkernels
from conftest import HAS_CUDA, HostSync, forbid_host_reads, host_syncs


def make_moco(device, dim=16, queue_size=40, **schedule):
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                  torch.nn.Linear(32, dim)).to(device)
    key_encoder = sslkernels.MomentumEncoder(encoder, 0.99, total_steps=100, **schedule)
    queue = sslkernels.MemoryQueue(queue_size, dim, device=device)
    opt = torch.optim.SGD(encoder.parameters(), lr=0.1, momentum=0.9)
    return encoder, key_encoder, queue, opt


def moco_step(encoder, key_encoder, queue, opt, x1, x2, backend=None):
    q = F.normalize(encoder(x1), dim=1)
    k = F.normalize(key_encoder(x2), dim=1)
    loss = sslkernels.moco_loss(q, k, queue, 0.2, backend=backend)
    opt.zero_grad(set_to_none=False)
    loss.backward()
    opt.step()
    key_encoder.update_(encoder)
    queue.enqueue_(k)
    return loss.detach()


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_moco_step_makes_no_host_read(backend):
    encoder, key_encoder, queue, opt = make_moco("cpu")
    x1, x2 = torch.randn(24, 12), torch.randn(24, 12)
    moco_step(encoder, key_encoder, queue, opt, x1, x2, backend)  # first step builds optimizer state
    with host_syncs():
        for _ in range(3):  # batch 24 into a queue of 40: the third step wraps around
            loss = moco_step(encoder, key_encoder, queue, opt, x1, x2, backend)
    assert torch.isfinite(loss).all()
    assert int(queue.ptr) == (4 * 24) % 40
    assert int(key_encoder.step) == 4


@pytest.mark.parametrize("schedule", [dict(schedule="cosine_epoch", steps_per_epoch=3), dict(schedule="constant"),
                                      dict(schedule="cosine", buffers="ema")], ids=str)
def test_every_momentum_schedule_stays_on_the_device(schedule):
    encoder, key_encoder, queue, opt = make_moco("cpu", **schedule)
    x1, x2 = torch.randn(50, 12), torch.randn(50, 12)  # batch 50 > queue 40: keeps the last 40 keys
    moco_step(encoder, key_encoder, queue, opt, x1, x2)
    with host_syncs():
        for _ in range(2):
            moco_step(encoder, key_encoder, queue, opt, x1, x2)
    assert int(queue.ptr) == (3 * 50) % 40 and int(key_encoder.step) == 3


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_lightly_memory_bank_step_makes_no_host_read(backend):
    # NTXentLoss(memory_bank_size=...) is lightly's MoCo: its bank write (cut at the end, ptr back to 0)
    # used to read the pointer on the host each step, as lightly does.
    if backend == "triton" and not (HAS_CUDA or sslkernels.backends.triton_interpreted()):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    torch.manual_seed(0)
    encoder = torch.nn.Linear(12, 16)
    loss_fn = sslkernels.nn.NTXentLoss(memory_bank_size=(40, 16), backend=backend)
    x1, x2 = torch.randn(24, 12), torch.randn(24, 12)
    with host_syncs():
        for _ in range(3):  # 0 -> 24 -> 0 (16 of 24 rows fit) -> 24
            loss = loss_fn(encoder(x1), encoder(x2))
            loss.backward()
    assert torch.isfinite(loss).all() and int(loss_fn.memory_bank.bank_ptr) == 24


def test_forbid_host_reads_catches_item():
    with forbid_host_reads(), pytest.raises(AssertionError, match="host read"):
        torch.ones(()).item()


# What host_syncs must catch beyond forbid_host_reads: each a wait on the GPU with CUDA tensors (x stands for one).
_SYNCS = {
    "tensor from Python data on the device": lambda x: torch.tensor(3, device=x.device),
    "host tensor moved to the device": lambda x: (torch.arange(3) * 2).to(x.device),
    "host tensor copied into a device tensor": lambda x: x.clone()[0].copy_(torch.tensor(1.0)),
    "host index tensor": lambda x: x[torch.tensor([0, 1])],
    "device tensor to the host": lambda x: x.cpu(),
    "boolean-mask index": lambda x: x[x > 0],
    "boolean-mask assignment": lambda x: x.clone().__setitem__(x > 0, 0.0),
    "nonzero": lambda x: torch.nonzero(x),
    "unique": lambda x: torch.unique(x),
    "repeat_interleave without output_size": lambda x: x.repeat_interleave(torch.ones_like(x, dtype=torch.long)),
    "torch.equal": lambda x: torch.equal(x, x),
    "item": lambda x: x.sum().item(),
    "synchronize": lambda x: torch.cuda.synchronize(),
}


@pytest.mark.parametrize("what", sorted(_SYNCS))
def test_host_syncs_catches(what):
    x = torch.randn(5)
    with host_syncs(), pytest.raises(HostSync):
        _SYNCS[what](x)


def test_host_syncs_allows_host_only_work_and_device_fills():
    x = torch.randn(5, requires_grad=True)
    with host_syncs():
        scale = float(torch.tensor(2.0, dtype=torch.float32) * 3)  # host tensors may be read: no GPU involved
        y = (x * torch.full((), scale, device=x.device)).masked_fill(x.detach() > 1, 0.0)
        y.sum().backward()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU: sync debug mode and CUDA graphs")
def test_moco_step_sync_free_and_graph_capturable_on_gpu():
    x1, x2 = torch.randn(64, 12, device="cuda"), torch.randn(64, 12, device="cuda")
    eager, graphed = make_moco("cuda"), make_moco("cuda")  # same seed: identical starting states
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (optimizer state, Triton compilation) off the capture stream
        for _ in range(2):
            moco_step(*eager, x1, x2)
            moco_step(*graphed, x1, x2)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager_loss = moco_step(*eager, x1, x2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed_loss = moco_step(*graphed, x1, x2)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(graphed_loss, eager_loss, rtol=1e-4, atol=1e-5)
    for pe, pg in zip(eager[0].parameters(), graphed[0].parameters()):
        torch.testing.assert_close(pg, pe, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(graphed[2].queue, eager[2].queue, rtol=1e-4, atol=1e-5)
    assert int(graphed[2].ptr) == int(eager[2].ptr)
    assert int(graphed[1].step) == int(eager[1].step)


# ---------------------------------------------------------------------------------- every step, host_syncs
# Each step runs once before (optimizer state, lazily made banks, kernel and plan caches), then twice under host_syncs.
# Tensor temperatures / logit scales are checked > 0 by value, a host read by design (_checks.positive_values) that
# is skipped under CUDA-graph capture and torch.compile tracing: those cases run with capture emulated, which
# confirms nothing else in the step reads back.


def _f(n=8, d=16):
    return F.normalize(torch.randn(n, d), dim=1).requires_grad_()


_PARAMS = {}


def _param(v):
    # A 0-d tensor with a gradient, made before the step (host_syncs lets a step read tensors it made on the host).
    if v not in _PARAMS:
        _PARAMS[v] = torch.nn.Parameter(torch.tensor(v))
    return _PARAMS[v] * 1


_LABELS = torch.tensor([0, 1, 0, 1, 2, 2, 3, 0])

_STEPS = {
    "info_nce": lambda be, t: sslkernels.info_nce(_f(), _f(), t(0.1), backend=be),
    "info_nce targets": lambda be, t: sslkernels.info_nce(_f(), _f(12), t(0.1), targets=torch.arange(8) + 2,
                                                          backend=be),
    "info_nce symmetric": lambda be, t: sslkernels.info_nce(_f(), _f(), t(0.1), symmetric=True, backend=be),
    "dcl": lambda be, t: sslkernels.info_nce(_f(), _f(), t(0.1), decoupled=True, backend=be),
    "nt_xent": lambda be, t: sslkernels.nt_xent(_f(), _f(), t(0.5), backend=be),
    "clip_loss": lambda be, t: sslkernels.clip_loss(_f(), _f(), t(10.0), backend=be),
    "siglip_loss": lambda be, t: sslkernels.siglip_loss(_f(), _f(), t(10.0), t(-1.0), backend=be),
    "moco_loss": lambda be, t: sslkernels.moco_loss(_f(), _f(), F.normalize(torch.randn(20, 16), dim=1), t(0.2),
                                                    backend=be),
    "supcon_loss": lambda be, t: sslkernels.supcon_loss(_f(), _LABELS, t(0.1), backend=be),
    "nn.ClipLoss scale+bias": lambda be, t: sslkernels.nn.ClipLoss(backend=be)(_f(), _f(), t(10.0), t(-1.0)),
    "nn.SigLipLoss": lambda be, t: sslkernels.nn.SigLipLoss(backend=be)(_f(), _f(), t(10.0), t(-1.0)),
}


# The backends a GPU step runs: "triton" ("auto" there) and "torch". ("auto" on CPU tensors picks the "cpu"
# implementations, which never run on a GPU; torch.unique in the CPU supcon_loss, say, is not a GPU sync.)
_GPU_BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not (HAS_CUDA or sslkernels.backends.triton_interpreted()), reason="Triton needs a GPU or TRITON_INTERPRET=1"))]


@pytest.mark.parametrize("temperature", ["float", "tensor"])
@pytest.mark.parametrize("backend", _GPU_BACKENDS)
@pytest.mark.parametrize("loss", sorted(_STEPS))
def test_loss_step_makes_no_host_sync(loss, backend, temperature, monkeypatch):
    if temperature == "tensor":
        monkeypatch.setattr(sslkernels._checks, "_capturing", lambda: True)
        t = _param
    else:
        t = float

    def step():
        out = _STEPS[loss](backend, t)
        out.backward()
        return out
    _steps_make_no_host_sync(step)


def _steps_make_no_host_sync(step):
    """A warm-up step (compilation, caches), then two under host_syncs; the loss stays finite."""
    step()
    with host_syncs():
        for _ in range(2):
            out = step()
    assert torch.isfinite(out).all()


def _module_steps():
    tq = lambda: [torch.randn(8, 10, requires_grad=True) for _ in range(2)]  # noqa: E731
    return {
        "NTXentLoss bank": (lambda be: sslkernels.nn.NTXentLoss(memory_bank_size=40, backend=be), lambda: (_f(), _f())),
        "DCLWLoss": (lambda be: sslkernels.nn.DCLWLoss(backend=be), lambda: (_f(), _f())),
        "MoCoLoss queue": (lambda be: sslkernels.nn.MoCoLoss(backend=be),
                           lambda q=sslkernels.MemoryQueue(20, 16): (_f(), _f(), q)),
        "BarlowTwinsLoss": (lambda be: sslkernels.nn.BarlowTwinsLoss(backend=be), lambda: (_f(), _f())),
        "VICRegLoss": (lambda be: sslkernels.nn.VICRegLoss(backend=be), lambda: (_f(), _f())),
        "NegativeCosineSimilarity": (lambda be: sslkernels.nn.NegativeCosineSimilarity(backend=be),
                                     lambda: (_f(), _f())),
        "SwaVLoss queue": (lambda be: sslkernels.nn.SwaVLoss(backend=be),
                           lambda: (tq(), [], [torch.randn(16, 10) for _ in range(2)])),
        "DINOLoss official": (lambda be: sslkernels.nn.DINOLoss(32, 4, 0.04, 0.04, 0, 10, backend=be),
                              lambda: (torch.randn(16, 32, requires_grad=True), torch.randn(8, 32), 1)),
        "DINOLoss lightly async": (
            lambda be: sslkernels.nn.DINOLoss(output_dim=32, warmup_teacher_temp_epochs=2, async_center=True,
                                              backend=be),
            lambda: ([torch.randn(4, 32) for _ in range(2)], [torch.randn(4, 32, requires_grad=True) for _ in range(4)],
                     None, 1)),
        # lightly's teacher that is not detached takes an eager path: its pair mask was a boolean index (a nonzero,
        # forward and backward) and an any() on the device.
        "DINOLoss lightly teacher gradient": (
            lambda be: sslkernels.nn.DINOLoss(output_dim=32, backend=be),
            lambda: ([torch.randn(4, 32, requires_grad=True) for _ in range(2)],
                     [torch.randn(4, 32, requires_grad=True) for _ in range(3)])),
    }


@pytest.mark.parametrize("backend", _GPU_BACKENDS)
@pytest.mark.parametrize("module", sorted(_module_steps()))
def test_loss_module_step_makes_no_host_sync(module, backend):
    make, inputs = _module_steps()[module]
    loss_fn = make(backend)

    def step():
        out = loss_fn(*inputs())
        out.sum().backward()
        return out
    _steps_make_no_host_sync(step)


# A device that is not the host, for the host -> device copies: CUDA where there is one; elsewhere "meta", on which
# host_syncs still sees a host tensor's .to(device).
_DEVICE = "cuda" if HAS_CUDA else "meta"


@pytest.mark.parametrize("step", ["int", "host tensor", "device tensor"])
def test_momentum_schedule_step_is_not_copied_from_the_host(step):
    # The trainers and the Lightning callback pass the step as an int; a CPU tensor step was moved with .to(device),
    # the same synchronous copy from pageable memory as torch.tensor(step, device=...).
    enc = sslkernels.MomentumEncoder(torch.nn.Linear(3, 3), 0.99, total_steps=10).to(_DEVICE)
    with host_syncs():
        value = {"int": lambda: 4, "host tensor": lambda: torch.tensor(4),
                 "device tensor": lambda: torch.full((), 4, device=_DEVICE)}[step]()
        m = enc.momentum_at(value)
    assert m.device.type == _DEVICE
    if HAS_CUDA:
        assert m.item() == pytest.approx(1 - 0.01 * (math.cos(math.pi * 0.4) + 1) / 2)


def test_ema_update_host_tensor_momentum_is_not_copied_to_the_device():
    # A momentum schedule kept as a CPU tensor was moved with .to(device) on every call: a synchronous copy from
    # pageable memory. Its value is read on the host instead (no device involved).
    targets, sources = [torch.empty(2, 3, device=_DEVICE)], [torch.empty(2, 3, device=_DEVICE)]  # meta: one pair
    for dtype in (torch.float32, torch.float64):
        sslkernels.ema_update_(targets, sources, torch.tensor(0.9, dtype=dtype), backend="torch")
        with host_syncs():  # made here, so host_syncs knows it for a host tensor (reading it involves no device)
            m = torch.tensor(0.9, dtype=dtype)
            sslkernels.ema_update_(targets, sources, m, backend="torch")

def test_ema_state_steps_make_no_host_sync():
    from sslkernels.integrations.lightly import update_momentum
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    encoders = [sslkernels.MomentumEncoder(net, 0.99, total_steps=100, **kw) for kw in
                (dict(), dict(schedule="cosine_epoch", steps_per_epoch=3), dict(schedule="constant"),
                 dict(buffers="ema"))]
    timm_ema, lightly_ema = sslkernels.nn.ModelEmaV3(net, use_warmup=True), torch.nn.Sequential(
        torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    m = torch.tensor(0.99, dtype=torch.float64)

    def step(i):
        for enc in encoders:
            enc.update_(net)
            enc.update_(net, i)
        sslkernels.ema_update_(list(lightly_ema.parameters()), list(net.parameters()), m)
        sslkernels.ema_update_(lightly_ema, net, 0.99)
        update_momentum(net, lightly_ema, 0.99)
        timm_ema.update(net, step=i)
    step(1)
    with host_syncs():
        for i in (2, 3):
            step(i)


@pytest.mark.parametrize("method", ["byol", "clip", "dino", "moco", "mocov3", "simclr", "simsiam", "supcon"])
def test_reference_trainer_step_makes_no_host_sync(method, monkeypatch):
    # One step of each trainer as core.fit runs it. optimizer.step() stays outside: AdamW (not capturable) keeps
    # its step counter on the host by design and reads it there. CLIP's logit scale is a tensor: its value check
    # is a host read by design, skipped as under capture.
    monkeypatch.setattr(sslkernels._checks, "_capturing", lambda: True)
    from sslkernels.train import METHODS, build_parser, core
    from sslkernels.train import data as data_lib
    import importlib
    extra = ["--local-crops", "1"] if method == "dino" else []
    args = build_parser().parse_args([method, "--data", "digits", "--subset", "64", "--batch-size", "16",
                                      "--device", "cpu", *extra])
    split = core.load_data(args, torch.device("cpu"))
    mod = importlib.import_module(f"sslkernels.train.{METHODS[method]}")
    cls = {"byol": "BYOL", "clip": "CLIP", "dino": "DINO", "moco": "MoCo", "mocov3": "MoCoV3", "simclr": "SimCLR",
           "simsiam": "SimSiam", "supcon": "SupCon"}[method]
    extra_arg = {"byol": (100,), "mocov3": (100,), "dino": (4,)}.get(method, ())
    model, opt = core.build_method(args, split, lambda a, s: getattr(mod, cls)(a, s, *extra_arg), torch.device("cpu"))
    idx = next(iter(data_lib.Shuffler(split.train_x.shape[0], args.batch_size, 0, torch.device("cpu"))))
    x, y = split.train_x[idx], split.train_y[idx]
    # The "cpu" implementations (what "auto" picks on CPU tensors) never run on a GPU: the oracle's path is the one
    # a GPU run with --impl reference takes, and the fused path is the Triton one (test_loss_step_makes_no_host_sync).
    model.backend = "torch"

    def step(i, check):
        with check():
            loss = model.training_step(x, y, i)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        with check():
            model.after_step(i)
    step(0, contextlib.nullcontext)
    for i in (1, 2):
        step(i, host_syncs)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU: sync debug mode")
def test_host_tensor_momentum_and_step_make_no_sync_on_gpu():
    # check.momentum accepts a 0-d CPU momentum for device tensors: update_center_ moved it with .to(device), a
    # synchronous copy from pageable memory. A CPU step tensor for MomentumEncoder the same.
    center, teacher = torch.zeros(1, 32, device="cuda"), torch.randn(16, 32, device="cuda")
    enc = sslkernels.MomentumEncoder(torch.nn.Linear(3, 3), 0.99, total_steps=10).cuda()
    m, step = torch.tensor(0.9), torch.tensor(4)
    ema_t, ema_s = torch.zeros(1000, device="cuda"), torch.ones(1000, device="cuda")
    sslkernels.update_center_(center, teacher, m)  # warm-up: compilation, the EMA's device tables
    sslkernels.ema_update_([ema_t], [ema_s], m)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sslkernels.update_center_(center, teacher, m)
        enc.momentum_at(step)
        sslkernels.ema_update_([ema_t], [ema_s], m)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = 0.1 * teacher.mean(0) * (1 + 0.9)
    torch.testing.assert_close(center.reshape(-1), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ema_t, torch.full_like(ema_t, 1 - 0.9 ** 2))
