"""Training-state ops of shared/API.md: ema_update_ (tensor lists and nn.Modules), MomentumEncoder and
MemoryQueue, against float64 arithmetic and a plain Python ring buffer written here."""
import copy
import math

import pytest
import torch
from torch import nn

from conftest import HAS_CUDA, assert_close

import sslkernels
from sslkernels import MemoryQueue, MomentumEncoder
from sslkernels.state import scheduled_momentum
from sslkernels.backends import available, triton_interpreted

F64 = torch.float64
SHAPES = [(7,), (13, 5), (3, 1, 4), ()]


def _queue_backends():
    # "auto" always; "triton" too where this machine can run it (CUDA, or the interpreter on CPU).
    names = ["torch", "auto"]
    if "triton" in available("queue_enqueue_"):
        from sslkernels.backends import _usable

        if _usable("triton", torch.device("cpu")):
            names.append("triton")
    return names


# ------------------------------------------------------------------------- ema_update_ on lists


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("mkind", ["float", "0d"])
@pytest.mark.parametrize("tdtype,sdtype", [(F64, F64), (torch.float32, torch.float32),
                                           (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                           (torch.bfloat16, torch.float32)], ids=str)
def test_ema_update_lists(tdtype, sdtype, mkind, backend):
    targets = [torch.randn(s, dtype=F64).to(tdtype) for s in SHAPES]
    sources = [torch.randn(s, dtype=F64).to(sdtype) for s in SHAPES]
    before = [t.double().clone() for t in targets]
    ptrs = [t.data_ptr() for t in targets]
    m = 0.996 if mkind == "float" else torch.tensor(0.996, dtype=torch.float32)
    m64 = 0.996 if mkind == "float" else float(m)  # the tensor holds 0.996 rounded to float32
    result = sslkernels.ema_update_(targets, sources, m, backend=backend)
    assert result is None
    for i, (t, b, s) in enumerate(zip(targets, before, sources)):
        assert t.data_ptr() == ptrs[i] and t.dtype == tdtype, "ema_update_ must work in place"
        want = m64 * b + (1 - m64) * s.double()
        # The result is rounded once to the target's dtype.
        assert_close(t, want, tdtype, name=f"target[{i}]")


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_ema_update_momentum_edges(backend):
    t = [torch.randn(13, 7), torch.randn(5)]
    s = [torch.randn(13, 7), torch.randn(5)]
    t0 = [x.clone() for x in t]
    sslkernels.ema_update_(t, s, 1.0, backend=backend)  # m = 1 keeps the target
    assert all(torch.equal(a, b) for a, b in zip(t, t0))
    sslkernels.ema_update_(t, s, 0.0, backend=backend)  # m = 0 copies the source
    assert all(torch.equal(a, b) for a, b in zip(t, s))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_ema_update_accepts_generators_and_parameters(backend):
    a, b = nn.Linear(7, 5), nn.Linear(7, 5)
    wa, wb = [p.detach().double().clone() for p in a.parameters()], [p.detach().double() for p in b.parameters()]
    sslkernels.ema_update_(a.parameters(), (p for p in b.parameters()), 0.9, backend=backend)
    for p, x, y in zip(a.parameters(), wa, wb):
        assert p.requires_grad
        assert_close(p, 0.9 * x + 0.1 * y, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_ema_update_empty_lists(backend):
    sslkernels.ema_update_([], [], 0.5, backend=backend)


# ------------------------------------------------------------------------- ema_update_ on modules


def _net(dtype=torch.float32):
    return nn.Sequential(nn.Linear(7, 13), nn.BatchNorm1d(13), nn.ReLU(), nn.Linear(13, 3)).to(dtype)


def _perturbed_copy(net, dtype=None):
    other = copy.deepcopy(net)
    if dtype is not None:
        other = other.to(dtype)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
        bn = other[1]
        bn.running_mean.copy_(torch.randn(13))
        bn.running_var.copy_(torch.rand(13) + 0.5)
        bn.num_batches_tracked.fill_(17)
    return other


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("buffers", ["copy", "ema", "skip", None])
@pytest.mark.parametrize("mkind", ["float", "0d"])
@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ema_update_modules(buffers, mkind, source_dtype, backend):
    target = _net()
    source = _perturbed_copy(target, source_dtype)
    t_params = {k: v.detach().double().clone() for k, v in target.named_parameters()}
    t_bufs = {k: v.detach().clone() for k, v in target.named_buffers()}
    m = 0.9 if mkind == "float" else torch.tensor(0.9)
    m64 = 0.9 if mkind == "float" else float(m)
    kwargs = {} if buffers is None else {"buffers": buffers}
    sslkernels.ema_update_(target, source, m, backend=backend, **kwargs)
    mode = buffers or "copy"
    s_params, s_bufs = dict(source.named_parameters()), dict(source.named_buffers())
    for k, p in target.named_parameters():
        assert p.dtype == torch.float32 and p.requires_grad
        assert_close(p, m64 * t_params[k] + (1 - m64) * s_params[k].detach().double(), torch.float32, name=k)
    for k, b in target.named_buffers():
        src = s_bufs[k]
        if not b.is_floating_point():
            assert torch.equal(b, src), f"integer buffer {k} must be copied"
        elif mode == "copy":
            assert_close(b, src.double(), torch.float32, name=k)
        elif mode == "ema":
            assert_close(b, m64 * t_bufs[k].double() + (1 - m64) * src.double(), torch.float32, name=k)
        else:
            assert torch.equal(b, t_bufs[k]), f"buffers='skip' changed {k}"


# ------------------------------------------------------------------------- MomentumEncoder


def _cosine(t, total, base, final):
    return final - (final - base) * (math.cos(math.pi * t / total) + 1) / 2


def test_momentum_encoder_is_a_frozen_copy():
    net = _net()
    enc = MomentumEncoder(net)
    assert enc.module is not net
    teacher_params = list(enc.parameters())
    assert teacher_params and not any(p.requires_grad for p in teacher_params)
    assert all(p.requires_grad for p in net.parameters()), "the online module must stay trainable"
    for (k, a), (_, b) in zip(net.state_dict().items(), enc.module.state_dict().items()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), k
    net.eval(), enc.eval()
    x = torch.randn(5, 7, requires_grad=True)
    y = enc(x)
    assert not y.requires_grad, "forward must run under no_grad"
    assert torch.equal(y, net(x).detach())


@pytest.mark.parametrize("base,final,total", [(0.996, 1.0, 10), (0.99, 0.999, 7), (0.9, 0.9, 3)])
def test_momentum_encoder_cosine_schedule(base, final, total):
    net = _net()
    enc = MomentumEncoder(net, base, final_momentum=final, schedule="cosine", total_steps=total)
    for t in range(total + 1):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))  # a "training step" of the online network
        before = {k: v.double().clone() for k, v in enc.module.named_parameters()}
        enc.update_(net)
        m = _cosine(t, total, base, final)
        for k, p in enc.module.named_parameters():
            want = m * before[k] + (1 - m) * dict(net.named_parameters())[k].detach().double()
            assert_close(p, want, torch.float32, name=f"step {t}: {k}")
    assert abs(_cosine(total, total, base, final) - final) < 1e-12


def test_momentum_encoder_explicit_step_and_defaults():
    net = _net()
    enc = MomentumEncoder(net, total_steps=100)  # default momentum 0.996 → final 1.0, cosine
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net[1].running_mean.copy_(torch.randn(13))
        net[1].num_batches_tracked.fill_(3)
    before = {k: v.double().clone() for k, v in enc.module.named_parameters()}
    enc.update_(net, step=37)
    m = _cosine(37, 100, 0.996, 1.0)
    for k, p in enc.module.named_parameters():
        want = m * before[k] + (1 - m) * dict(net.named_parameters())[k].detach().double()
        assert_close(p, want, torch.float32, name=k)
    # Buffers follow ema_update_'s default, buffers="copy" (BatchNorm statistics of the online network).
    for (k, a), (_, b) in zip(net.named_buffers(), enc.module.named_buffers()):
        assert torch.equal(a, b), k


def test_momentum_encoder_int_step_is_not_built_on_the_host():
    # Training loops pass the step as an int every iteration (sslkernels.train, the Lightning callback). A tensor
    # made from it on the host (torch.tensor(step, device=...)) is a synchronous copy from pageable memory on a
    # GPU: the host would wait for the device on every step. A fill takes the int as a kernel argument instead.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func)
            return func(*args, **(kwargs or {}))

    net = _net()
    enc = MomentumEncoder(net, 0.9, total_steps=20)
    enc.update_(net, 3)  # first call: caches
    with Ops() as ops:
        m = enc.update_(net, 7)
        m_at = enc.momentum_at(9)
    assert torch.ops.aten.lift_fresh.default not in ops.seen, "a step tensor was built from host data"
    assert int(enc.step) == 8 and enc.step.dtype == torch.long and enc.step.dim() == 0
    assert float(m) == _cosine(7, 20, 0.9, 1.0) and float(m_at) == _cosine(9, 20, 0.9, 1.0)


def test_momentum_encoder_state_dict_resumes_the_schedule():
    # A checkpoint holds the teacher and the step counter: a resumed encoder continues the momentum schedule
    # where it stopped (a step left out of the state dict would restart it at base momentum).
    net = _net()
    enc = MomentumEncoder(net, 0.9, total_steps=20)
    for _ in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        enc.update_(net)
    sd = enc.state_dict()
    assert int(sd["step"]) == 5 and {k for k in sd if k != "step"} == {"module." + k for k in net.state_dict()}
    resumed = MomentumEncoder(_net(), 0.9, total_steps=20)
    resumed.load_state_dict(sd)
    assert resumed.step.dim() == 0 and resumed.step.dtype == torch.long
    m1, m2 = enc.update_(net), resumed.update_(net)
    assert float(m1) == float(m2) == _cosine(5, 20, 0.9, 1.0)
    for (k, a), (_, b) in zip(enc.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_momentum_encoder_without_total_steps_keeps_base_momentum():
    net = _net()
    enc = MomentumEncoder(net, 0.5)
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(-2.0)
        before = {k: v.double().clone() for k, v in enc.module.named_parameters()}
        enc.update_(net)
        for k, p in enc.module.named_parameters():
            want = 0.5 * before[k] + 0.5 * dict(net.named_parameters())[k].detach().double()
            assert_close(p, want, torch.float32, name=k)


def test_momentum_encoder_constant_schedule():
    net = _net()
    enc = MomentumEncoder(net, 0.75, schedule="constant", total_steps=4)
    for _ in range(6):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        before = {k: v.double().clone() for k, v in enc.module.named_parameters()}
        enc.update_(net)
        for k, p in enc.module.named_parameters():
            want = 0.75 * before[k] + 0.25 * dict(net.named_parameters())[k].detach().double()
            assert_close(p, want, torch.float32, name=k)


def _cosine_epoch(t, total, spe, base, final):
    # MoCo v3's adjust_moco_momentum at whole epochs: 1 − (1 − base)·(cos(π·epoch/epochs) + 1)/2 for final 1.
    epoch, epochs = t // spe, total / spe
    return final - (final - base) * (math.cos(math.pi * min(epoch / epochs, 1.0)) + 1) / 2


@pytest.mark.parametrize("schedule", ["cosine", "cosine_epoch", "constant"])
@pytest.mark.parametrize("base,final,total,spe", [(0.99, 1.0, 100, 10), (0.996, 1.0, 1000, 7), (0.9, 0.99, 12, 5)])
def test_scheduled_momentum_matches_float64_closed_forms(schedule, base, final, total, spe):
    steps = list(range(0, total + 2 * spe + 1))
    got = scheduled_momentum(torch.tensor(steps), base, final, total, schedule, steps_per_epoch=spe)
    assert got.dtype == F64 and got.device.type == "cpu"
    for t, m in zip(steps, got.tolist()):
        want = {"cosine": lambda: _cosine(min(t, total), total, base, final),
                "cosine_epoch": lambda: _cosine_epoch(t, total, spe, base, final),
                "constant": lambda: base}[schedule]()
        assert abs(m - want) <= 1e-12, (schedule, t, m, want)
    if schedule == "cosine_epoch":
        # Constant within an epoch, and it reaches final_momentum at the last epoch boundary and stays.
        for e in range(total // spe):
            assert len(set(got[e * spe:(e + 1) * spe].tolist())) == 1
        assert abs(got[-1].item() - final) < 1e-12
        # final = 1: exactly MoCo v3's formula at whole epochs.
        if final == 1.0:
            for t in steps:
                e = t // spe
                want = 1.0 - 0.5 * (1.0 + math.cos(math.pi * min(e / (total / spe), 1.0))) * (1.0 - base)
                assert abs(float(got[t]) - want) <= 1e-12


def test_scheduled_momentum_without_total_steps_is_base_and_cosine_epoch_needs_steps_per_epoch():
    for schedule in ("cosine", "cosine_epoch", "constant"):
        m = scheduled_momentum(torch.tensor(123), 0.99, 1.0, None, schedule, steps_per_epoch=10)
        assert m.dim() == 0 and float(m) == 0.99
    with pytest.raises(ValueError, match="steps_per_epoch"):
        scheduled_momentum(torch.tensor(3), 0.99, 1.0, 100, "cosine_epoch")
    with pytest.raises(ValueError, match="steps_per_epoch"):
        MomentumEncoder(_net(), schedule="cosine_epoch", total_steps=100)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        MomentumEncoder(_net(), schedule="cosine_epoch", total_steps=100, steps_per_epoch=0)
    with pytest.raises(ValueError, match="schedule"):
        scheduled_momentum(torch.tensor(3), 0.99, 1.0, 100, "linear")
    with pytest.raises(ValueError, match="buffers"):
        MomentumEncoder(_net(), buffers="average")


def test_momentum_encoder_cosine_epoch_schedule():
    base, total, spe = 0.9, 12, 4
    net = _net()
    enc = MomentumEncoder(net, base, schedule="cosine_epoch", total_steps=total, steps_per_epoch=spe,
                          buffers="ema")
    for t in range(total + 2):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        before = {k: v.double().clone() for k, v in enc.module.named_parameters()}
        m = enc.update_(net)
        want_m = _cosine_epoch(t, total, spe, base, 1.0)
        assert abs(float(m) - want_m) < 1e-12
        for k, p in enc.module.named_parameters():
            want = want_m * before[k] + (1 - want_m) * dict(net.named_parameters())[k].detach().double()
            assert_close(p, want, torch.float32, name=f"step {t}: {k}")
    # The schedule is driven by a device step tensor: an explicit tensor step works the same.
    assert abs(float(enc.momentum_at(torch.tensor(5))) - _cosine_epoch(5, total, spe, base, 1.0)) < 1e-12


# ------------------------------------------------------------------------- MemoryQueue


class _PyRing:
    """The obvious ring buffer: write every row in order at ptr, advance ptr by one."""

    def __init__(self, rows):
        self.rows, self.ptr = [r.clone() for r in rows], 0

    def enqueue(self, keys):
        for r in keys:
            self.rows[self.ptr] = r.clone()
            self.ptr = (self.ptr + 1) % len(self.rows)

    def tensor(self):
        return torch.stack(self.rows)


@pytest.mark.parametrize("backend", _queue_backends())
@pytest.mark.parametrize("qdtype,kdtype", [(torch.float32, torch.float32), (F64, F64),
                                           (torch.float32, F64), (torch.float32, torch.float16)], ids=str)
@pytest.mark.parametrize("size,batches", [(10, [3, 4, 5, 13, 1, 10, 25, 2]), (7, [7, 7, 3]), (1, [1, 3]),
                                          (16, [16, 5, 40])])
def test_memory_queue_ring_buffer(size, batches, qdtype, kdtype, backend):
    q = MemoryQueue(size, 5, dtype=qdtype)
    assert q.queue.shape == (size, 5) and q.queue.dtype == qdtype
    assert q.ptr.dim() == 0 and q.ptr.dtype == torch.int64 and q.ptr.device == q.queue.device
    assert int(q.ptr) == 0
    ring = _PyRing(q.queue)
    ptr_obj, ptr_addr, queue_addr = q.ptr, q.ptr.data_ptr(), q.queue.data_ptr()
    for b in batches:
        keys = torch.randn(b, 5, dtype=F64).to(kdtype)
        out = q.enqueue_(keys, backend=backend)
        ring.enqueue(keys.to(qdtype))  # a plain cast: enqueue must not change the values otherwise
        assert torch.equal(q.queue, ring.tensor()), f"after a batch of {b}"
        assert q.ptr.dim() == 0 and q.ptr.dtype == torch.int64 and int(q.ptr) == ring.ptr
        assert out is None or out is q
    # Updated in place: the ptr tensor and the queue storage are never replaced (CUDA graphs, no sync).
    assert q.ptr is ptr_obj and q.ptr.data_ptr() == ptr_addr and q.queue.data_ptr() == queue_addr


@pytest.mark.parametrize("backend", _queue_backends())
def test_memory_queue_enqueue_normalize(backend):
    # normalize=True must reach the op: rows L2-normalized on the way in (a zero row stays zero), the plain
    # cast otherwise, with the ring's wrap-around either way.
    q = MemoryQueue(5, 6, dtype=torch.float32)
    keys = torch.randn(4, 6, dtype=F64) * 3
    keys[3] = 0
    q.enqueue_(keys.float(), normalize=True, backend=backend)  # rows 0..3, ptr 4
    q.enqueue_(keys[:3].float(), backend=backend)  # rows 4, 0, 1 as they are, ptr 2
    unit = torch.nn.functional.normalize(keys, dim=1)
    assert_close(q.queue[[4, 0, 1]], keys[:3], torch.float32)
    assert_close(q.queue[[2, 3]], unit[2:4], torch.float32)
    assert unit[2].norm() > 0.99 and int(q.ptr) == 2


def test_memory_queue_is_a_module_with_two_buffers():
    q = MemoryQueue(12, 3)
    assert isinstance(q, nn.Module)
    assert set(dict(q.named_buffers())) == {"queue", "ptr"}
    assert not list(q.parameters())
    assert q.queue.dtype == torch.float32 and q.queue.device.type == "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_memory_queue_state_dict_round_trip(dtype):
    a = MemoryQueue(11, 6, dtype=dtype)
    for b in (4, 5, 9):
        a.enqueue_(torch.randn(b, 6, dtype=dtype))
    sd = a.state_dict()
    assert set(sd) == {"queue", "ptr"} and sd["ptr"].dim() == 0 and int(sd["ptr"]) == 18 % 11
    b = MemoryQueue(11, 6, dtype=dtype)
    b.load_state_dict(sd)
    assert torch.equal(b.queue, a.queue) and torch.equal(b.ptr, a.ptr)
    assert b.ptr.dim() == 0 and b.ptr.dtype == torch.int64
    # Both continue identically.
    keys = torch.randn(7, 6, dtype=dtype)
    a.enqueue_(keys), b.enqueue_(keys)
    assert torch.equal(b.queue, a.queue) and torch.equal(b.ptr, a.ptr)
    # And through torch.save / torch.load.
    import io

    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    c = MemoryQueue(11, 6, dtype=dtype)
    c.load_state_dict(torch.load(buf))
    assert torch.equal(c.queue, a.queue) and torch.equal(c.ptr, a.ptr)


def test_memory_queue_dim_mismatch():
    q = MemoryQueue(8, 5)
    with pytest.raises(ValueError, match="dim"):
        q.enqueue_(torch.randn(3, 6))


def test_memory_queue_as_moco_negatives():
    q = MemoryQueue(9, 7, dtype=F64)
    q.enqueue_(torch.nn.functional.normalize(torch.randn(9, 7, dtype=F64), dim=1))
    qry = torch.nn.functional.normalize(torch.randn(4, 7, dtype=F64), dim=1)
    key = torch.nn.functional.normalize(torch.randn(4, 7, dtype=F64), dim=1)
    logits = torch.cat([(qry * key).sum(1, keepdim=True), qry @ q.queue.T], dim=1) / 0.2
    want = torch.nn.functional.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
    assert_close(sslkernels.moco_loss(qry, key, q.queue, 0.2), want, F64)


def test_memory_queue_state_dict_from_another_dtype_and_ptr_layout():
    # Saved from an fp16 queue, loaded into an fp32 one: values cast exactly (fp16 ⊂ fp32), ptr as saved.
    a = MemoryQueue(9, 4, dtype=torch.float16)
    a.enqueue_(torch.randn(13, 4))  # batch > size: keeps the last 9 rows, ptr = 13 % 9
    b = MemoryQueue(9, 4)
    b.load_state_dict(a.state_dict())
    assert b.queue.dtype == torch.float32 and torch.equal(b.queue, a.queue.float())
    assert b.ptr.dtype == torch.int64 and b.ptr.dim() == 0 and int(b.ptr) == 4
    # The official MoCo layout of the pointer (a 1-element tensor) and other integer dtypes load too.
    c = MemoryQueue(9, 4)
    c.load_state_dict({"queue": b.queue.clone(), "ptr": torch.tensor([7], dtype=torch.int32)})
    assert c.ptr.dim() == 0 and c.ptr.dtype == torch.int64 and int(c.ptr) == 7
    ptr_obj = c.ptr
    c.load_state_dict(b.state_dict())
    assert c.ptr is ptr_obj and int(c.ptr) == 4  # loaded into the existing buffer (CUDA graphs keep its address)
    # load_state_dict(assign=True) takes the saved tensors as they are: ptr must still become 0-d int64.
    d = MemoryQueue(9, 4)
    d.load_state_dict({"queue": b.queue.clone(), "ptr": torch.tensor([5], dtype=torch.int32)}, assign=True)
    assert d.ptr.dim() == 0 and d.ptr.dtype == torch.int64 and int(d.ptr) == 5
    for bad, match in ((torch.tensor(9), "outside"), (torch.tensor(-1), "outside"), (torch.tensor(2.0), "integer"),
                       (torch.tensor([1, 2]), "integer")):
        with pytest.raises(RuntimeError, match=match):
            c.load_state_dict({"queue": b.queue.clone(), "ptr": bad})
    with pytest.raises(RuntimeError, match="size mismatch"):
        MemoryQueue(8, 4).load_state_dict(a.state_dict())


def test_memory_queue_inside_a_model_round_trips_with_prefix():
    model = nn.Module()
    model.queue = MemoryQueue(6, 3, dtype=F64)
    model.queue.enqueue_(torch.randn(4, 3, dtype=F64))
    sd = model.state_dict()
    assert set(sd) == {"queue.queue", "queue.ptr"}
    other = nn.Module()
    other.queue = MemoryQueue(6, 3, dtype=F64)
    other.load_state_dict(sd)
    assert torch.equal(other.queue.queue, model.queue.queue) and torch.equal(other.queue.ptr, model.queue.ptr)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: state dict moved across devices")
def test_memory_queue_state_dict_across_devices():
    import io

    gpu = MemoryQueue(10, 5, device="cuda")
    gpu.enqueue_(torch.randn(7, 5, device="cuda"))
    buf = io.BytesIO()
    torch.save(gpu.state_dict(), buf)
    buf.seek(0)
    cpu = MemoryQueue(10, 5)
    cpu.load_state_dict(torch.load(buf))  # CUDA tensors in the file, loaded into a CPU queue
    assert cpu.queue.device.type == "cpu" and cpu.ptr.device.type == "cpu"
    assert torch.equal(cpu.queue, gpu.queue.cpu()) and int(cpu.ptr) == int(gpu.ptr)
    back = MemoryQueue(10, 5, dtype=torch.bfloat16, device="cuda")
    back.load_state_dict(cpu.state_dict())
    assert back.ptr.device.type == "cuda" and torch.equal(back.queue, cpu.queue.to("cuda", torch.bfloat16))
    keys = torch.randn(3, 5)
    cpu.enqueue_(keys), gpu.enqueue_(keys.cuda())
    assert torch.equal(cpu.queue, gpu.queue.cpu()) and int(cpu.ptr) == int(gpu.ptr)


# ------------------------------------------------------------------------- ema_update_ on DTensors


@pytest.fixture
def single_process_group(tmp_path):
    """A one-rank gloo process group and a CPU device mesh (torch.distributed on CPU, no launcher)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    try:
        from torch.distributed.device_mesh import init_device_mesh

        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    except Exception as err:  # pragma: no cover - depends on the torch build
        pytest.skip(f"cannot start a single-process gloo group: {err}")
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_ema_update_on_dtensors_uses_local_shards(single_process_group):
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = single_process_group
    shapes = [(8, 3), (5,), (4, 2, 3)]
    placements = [[Shard(0)], [Replicate()], [Shard(1)]]
    t_full = [torch.randn(sh, dtype=F64).float() for sh in shapes]
    s_full = [torch.randn(sh, dtype=F64).to(torch.bfloat16) for sh in shapes]
    targets = [distribute_tensor(t, mesh, p) for t, p in zip(t_full, placements)]
    sources = [distribute_tensor(s, mesh, p) for s, p in zip(s_full, placements)]
    assert all(isinstance(t, DTensor) for t in targets)
    local_ptrs = [t._local_tensor.data_ptr() for t in targets]
    t_before = [t.to_local().double().clone() for t in targets]  # (a one-rank shard may alias t_full)
    s_before = [s.to_local().double().clone() for s in sources]
    m = torch.tensor(0.8, dtype=F64)
    sslkernels.ema_update_(targets, sources, m)
    for t, tb, sb, ptr in zip(targets, t_before, s_before, local_ptrs):
        assert isinstance(t, DTensor) and t._local_tensor.data_ptr() == ptr, "updated in place, shard by shard"
        assert_close(t.to_local(), 0.8 * tb + 0.2 * sb, torch.float32)
    # A DTensor paired with a plain tensor of its local shape: that tensor is the shard's source.
    plain = [s.to_local().clone() for s in sources]
    before = [t.to_local().double().clone() for t in targets]
    sslkernels.ema_update_(targets, plain, 0.5)
    for t, b, s in zip(targets, before, plain):
        assert_close(t.to_local(), 0.5 * b + 0.5 * s.double(), torch.float32)
    # Different placements do not pair up shard by shard.
    with pytest.raises(ValueError, match="placements"):
        sslkernels.ema_update_([targets[0]], [distribute_tensor(s_full[0], mesh, [Replicate()])], 0.5)


@pytest.mark.parametrize("buffers", ["copy", "ema", "skip"])
def test_ema_update_on_fsdp2_sharded_modules(single_process_group, buffers):
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # pragma: no cover - depends on the torch build
        pytest.skip("torch.distributed.fsdp.fully_shard is not available")
    from torch.distributed.tensor import DTensor

    mesh = single_process_group
    plain_target = _net()
    plain_source = _perturbed_copy(plain_target)
    target, source = copy.deepcopy(plain_target), copy.deepcopy(plain_source)
    try:
        fully_shard(target, mesh=mesh)
        fully_shard(source, mesh=mesh)
    except Exception as err:  # pragma: no cover - depends on the torch build
        pytest.skip(f"fully_shard on a CPU mesh is not supported here: {err}")
    assert all(isinstance(p, DTensor) for p in target.parameters())
    # The same update on the unsharded twins is the expectation (one rank: the shard is the whole tensor).
    sslkernels.ema_update_(plain_target, plain_source, 0.9, buffers=buffers)
    sslkernels.ema_update_(target, source, torch.tensor(0.9), buffers=buffers)
    for (k, p), (_, want) in zip(target.named_parameters(), plain_target.named_parameters()):
        assert_close(p.to_local(), want.detach().double(), torch.float32, name=k)
    for (k, b), (_, want) in zip(target.named_buffers(), plain_target.named_buffers()):
        if b.is_floating_point():
            assert_close(b, want.double(), torch.float32, name=k)
        else:
            assert torch.equal(b, want), k  # num_batches_tracked: always copied
    assert int(target[1].num_batches_tracked) == 17


@pytest.mark.parametrize("backend", _queue_backends())
@pytest.mark.parametrize("loss_backend", ["torch", "auto"] + (["triton"] if "triton" in available("moco_loss") else []))
def test_enqueue_before_backward_is_an_error_not_a_stale_gradient(backend, loss_backend):
    # moco_loss may save the queue for its backward. An enqueue in between must never let the backward read
    # the new rows silently (the kernels write through raw pointers): enqueue_ bumps the version counter,
    # so autograd raises its in-place error, unless the path already took its gradient in the forward
    # (the CPU path), which must then be the gradient against the queue the forward saw.
    dev = "cuda" if HAS_CUDA and loss_backend == "triton" else "cpu"
    if loss_backend == "triton" and dev == "cpu" and not triton_interpreted():
        pytest.skip("the Triton loss runs on CPU tensors only under the interpreter")
    q = MemoryQueue(32, 8).to(dev)
    q.enqueue_(torch.nn.functional.normalize(torch.randn(32, 8, device=dev), dim=1), backend=backend)
    qry = torch.randn(4, 8, device=dev, requires_grad=True)
    key = torch.randn(4, 8, device=dev)
    seen = q.queue.clone()
    (want,) = torch.autograd.grad(sslkernels.moco_loss(qry.double(), key.double(), seen.double(), 0.2,
                                                       backend="torch"), qry)
    loss = sslkernels.moco_loss(qry, key, q.queue, 0.2, backend=loss_backend)
    q.enqueue_(torch.randn(4, 8, device=dev) * 3, backend=backend)
    assert not torch.equal(q.queue, seen)
    try:
        (g,) = torch.autograd.grad(loss, qry)
    except RuntimeError as err:
        assert "inplace" in str(err)
        assert loss_backend != "auto" or dev != "cpu"  # the CPU path needs no error: see above
    else:
        assert_close(g, want, torch.float32)
    # The official MoCo order (enqueue inside the forward) stays correct with a clone for the loss.
    snapshot = q.queue.clone()
    loss = sslkernels.moco_loss(qry, key, snapshot, 0.2, backend=loss_backend)
    q.enqueue_(torch.randn(4, 8, device=dev), backend=backend)
    (g,) = torch.autograd.grad(loss, qry)
    (want,) = torch.autograd.grad(sslkernels.moco_loss(qry.double(), key.double(), snapshot.double(), 0.2,
                                                       backend="torch"), qry)
    assert_close(g, want, torch.float32)


def test_momentum_encoder_update_takes_a_backend():
    torch.manual_seed(0)
    net = nn.Linear(5, 3)
    encs = [MomentumEncoder(net, 0.9) for _ in range(2)]
    with torch.no_grad():
        net.weight.add_(1.0)
    encs[0].update_(net, backend="torch")
    encs[1].update_(net)
    for a, b in zip(encs[0].module.parameters(), encs[1].module.parameters()):
        assert_close(a, b.double(), torch.float32)
    with pytest.raises(ValueError, match="backend"):
        encs[0].update_(net, backend="nope")


# ------------------------------------------------------------------- ema_update_: autograd, aliasing, state


def _kernel_marks(backend):
    if backend == "cuda":
        from sslkernels.backends import cuda_extension

        return pytest.mark.skipif(not HAS_CUDA or cuda_extension() is None,
                                  reason="needs a GPU and the built sslkernels._C extension")
    if backend == "triton":
        return pytest.mark.skipif(not HAS_CUDA and not triton_interpreted(),
                                  reason="Triton needs a GPU or TRITON_INTERPRET=1")
    return ()


_EVERY_BACKEND = [pytest.param(b, marks=_kernel_marks(b)) for b in ("torch", "auto", "triton", "cuda")]


def _device_for(backend):
    return "cuda" if HAS_CUDA or backend == "cuda" else "cpu"


@pytest.mark.parametrize("backend", _EVERY_BACKEND)
def test_ema_update_before_backward_is_an_error_not_a_stale_gradient(backend):
    # The kernels write through raw addresses: they must bump the version counters as lerp_ does, so a graph
    # that saved a target raises autograd's in-place error instead of using the updated values.
    dev = _device_for(backend)
    dense = torch.randn(4, 5, device=dev)
    strided = torch.randn(4, 10, device=dev)[:, ::2]  # the eager fallback of the kernel backends
    for target in (dense, strided):
        x = torch.randn(4, 5, device=dev, requires_grad=True)
        loss = (x * target).sum()  # saves target for the backward
        sslkernels.ema_update_([dense, strided], [torch.zeros(4, 5, device=dev)] * 2, 0.5, backend=backend)
        with pytest.raises(RuntimeError, match="inplace"):
            loss.backward()


@pytest.mark.parametrize("backend", _EVERY_BACKEND)
def test_model_ema_forward_then_update_before_backward_raises(backend):
    # nn.ModelEmaV3.forward runs with grad (as timm's): timm raises here, so must every backend.
    from sslkernels.nn import ModelEmaV3

    dev = _device_for(backend)
    model = nn.Linear(5, 3).to(dev)
    ema = ModelEmaV3(model, decay=0.5, backend=backend)
    loss = ema(torch.randn(2, 5, device=dev, requires_grad=True)).sum()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


@pytest.mark.parametrize("backend", _EVERY_BACKEND)
def test_ema_update_rejects_a_target_listed_twice_or_overlapping(backend):
    dev = _device_for(backend)
    a, b = torch.randn(64, device=dev), torch.randn(8, 8, device=dev)
    src = [torch.randn(64, device=dev), torch.randn(8, 8, device=dev), torch.randn(64, device=dev)]
    before = [a.clone(), b.clone()]
    with pytest.raises(ValueError, match=r"target\[0\] and target\[2\] are the same tensor"):
        sslkernels.ema_update_([a, b, a], src, 0.9, backend=backend)
    flat = torch.randn(100, device=dev)
    with pytest.raises(ValueError, match=r"target\[1\] and target\[2\] overlap"):  # [10, 40) and [39, 59)
        sslkernels.ema_update_([b, flat[10:40], flat[39:59]], [src[1], src[0][:30], src[0][:20]], 0.9,
                               backend=backend)
    with pytest.raises(ValueError, match=r"target\[0\] and target\[1\] overlap"):  # another view of b's memory
        sslkernels.ema_update_([b, b.view(64)[60:]], [src[1], src[0][:4]], 0.9, backend=backend)
    assert torch.equal(a, before[0]) and torch.equal(b, before[1]), "a rejected call changed a target"
    # Views of one flat buffer that do not overlap are separate targets (as a flat-parameter layout has).
    views = [flat[0:10], flat[10:40].view(5, 6), flat[40:41], flat[41:41], flat[41:100]]
    srcs = [torch.randn(v.shape, device=dev) for v in views]
    want = [0.9 * v.double() + 0.1 * s.double() for v, s in zip(views, srcs)]
    sslkernels.ema_update_(views, srcs, 0.9, backend=backend)
    for v, w in zip(views, want):
        assert_close(v, w, torch.float32)


@pytest.mark.parametrize("backend", _EVERY_BACKEND)
def test_ema_update_rejects_a_target_that_another_pair_reads(backend):
    # ema_update_([a, b], [b, c]): one launch would read b for a's update while another program writes it (the
    # eager result would depend on the list's order). A pair's own source may be its target (t = t, no race).
    dev = _device_for(backend)
    a, b, c = (torch.randn(40, device=dev) for _ in range(3))
    with pytest.raises(ValueError, match=r"target\[1\] shares memory with source\[0\]"):
        sslkernels.ema_update_([a, b], [b, c], 0.9, backend=backend)
    flat = torch.randn(100, device=dev)
    with pytest.raises(ValueError, match=r"target\[0\] shares memory with source\[1\]"):  # [0, 50) and [45, 60)
        sslkernels.ema_update_([flat[:50], a], [c[:50].repeat(2)[:50], flat[45:85]], 0.9, backend=backend)
    with pytest.raises(ValueError, match=r"target\[0\] shares memory with source\[0\]"):  # [0, 50) and [10, 60)
        sslkernels.ema_update_([flat[:50]], [flat[10:60]], 0.9, backend=backend)
    before = a.clone()
    sslkernels.ema_update_([a, flat[:50]], [a, flat[50:]], 0.9, backend=backend)  # allowed: own source; disjoint
    assert_close(a, before.double(), torch.float32)


def test_ema_overlap_check_runs_once_per_signature(monkeypatch):
    from sslkernels import _checks

    targets, sources = [torch.randn(5), torch.randn(3)], [torch.randn(5), torch.randn(3)]
    sslkernels.ema_update_(targets, sources, 0.9)
    monkeypatch.setattr(_checks, "ema_disjoint_targets", lambda *a: pytest.fail("re-checked a known signature"))
    sslkernels.ema_update_(targets, sources, 0.9)


@pytest.mark.parametrize("backend", _EVERY_BACKEND)
def test_model_ema_with_tied_weights_passes_the_overlap_check(backend):
    # ModelEmaV3 lists a tied weight once, with decay**2 (its state dict has it twice).
    from sslkernels.nn import ModelEmaV3

    dev = _device_for(backend)
    model = nn.Sequential(nn.Linear(6, 6, bias=False), nn.Linear(6, 6, bias=False)).to(dev)
    model[1].weight = model[0].weight
    ema = ModelEmaV3(model, decay=0.9, backend=backend)
    t0 = ema.module[0].weight.detach().double().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    assert_close(ema.module[0].weight, 0.81 * t0 + 0.19 * model[0].weight.double(), torch.float32)
    assert ema.module[1].weight is ema.module[0].weight


@pytest.mark.parametrize("backend", _EVERY_BACKEND)
def test_ema_update_stays_at_the_fixed_point(backend):
    # source == target is a fixed point of t <- m*t + (1-m)*s: computed as m*t + w*s with m*t rounded on
    # its own it drifts (hundreds of ulp); lerp and fma keep it exactly (frozen layers stay identical).
    dev = _device_for(backend)
    x = torch.randn(3000, device=dev) * 3
    for m in (0.9995, 0.996, torch.tensor(0.996, dtype=F64, device=dev), torch.tensor(0.99, device=dev)):
        t = x.clone()
        for _ in range(200):
            sslkernels.ema_update_([t], [x], m, backend=backend)
        assert torch.equal(t, x), f"momentum {m}: {(t != x).sum().item()} elements moved"


def test_ema_update_empty_lists_need_no_extension(monkeypatch):
    import sslkernels.ops.ema as ema

    monkeypatch.setattr(ema, "cuda_extension", lambda: None)  # as where sslkernels._C was not built
    available("ema_update_")["cuda"]([], [], 0.5)  # nothing to launch: no extension needed
    with pytest.raises(RuntimeError, match="not built"):
        available("ema_update_")["cuda"]([torch.randn(3)], [torch.randn(3)], 0.5)


def test_ema_validation_cache_tells_devices_apart():
    # A zero-size tensor has address 0 on every device: the device must be part of the cached signature.
    x, s = torch.randn(3), torch.randn(3)
    sslkernels.ema_update_([torch.empty(0), x], [torch.empty(0), s], 0.5)
    with pytest.raises(ValueError, match="one device"):
        sslkernels.ema_update_([torch.empty(0, device="meta"), x], [torch.empty(0, device="meta"), s], 0.5)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_unchanged(module, saved):
    for k, v in module.state_dict().items():
        assert torch.equal(v, saved[k]), f"a rejected call changed {k}"


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_ema_update_modules_validates_before_writing(backend):
    target, source = _net(), _perturbed_copy(_net())
    saved = _state(target)
    with pytest.raises(ValueError, match="momentum must be in"):
        sslkernels.ema_update_(target, source, 1.5, backend=backend)
    _assert_unchanged(target, saved)
    # A parameter of another shape: named, and nothing written (buffers included).
    bad = _perturbed_copy(target)
    bad[3] = nn.Linear(13, 4)
    with pytest.raises(ValueError, match=r"'3\.weight' has shape \(3, 13\) but source '3\.weight' has \(4, 13\)"):
        sslkernels.ema_update_(target, bad, 0.9, backend=backend)
    _assert_unchanged(target, saved)
    # A buffer of another shape, after others that would have been copied first.
    bad = _perturbed_copy(target)
    bad[1].running_var = torch.ones(14)
    with pytest.raises(ValueError, match=r"buffer '1\.running_var' has shape \(13,\) in the target but \(14,\)"):
        sslkernels.ema_update_(target, bad, 0.9, backend=backend)
    _assert_unchanged(target, saved)
    bad = _perturbed_copy(target)
    bad[1].weight = nn.Parameter(torch.ones(13, dtype=torch.int64), requires_grad=False)
    with pytest.raises(TypeError, match=r"target '1\.weight' and source '1\.weight' must be floating-point"):
        sslkernels.ema_update_(target, bad, 0.9, backend=backend)
    _assert_unchanged(target, saved)


class _Wrapped(nn.Module):
    def __init__(self, attr, inner):
        super().__init__()
        setattr(self, attr, inner)


@pytest.mark.parametrize("attr,hint", [("module", "DDP"), ("_orig_mod", "torch.compile")])
def test_ema_update_modules_names_a_wrapper_prefix(attr, hint):
    target, source = _net(), _perturbed_copy(_net())
    saved = _state(target)
    with pytest.raises(ValueError, match=rf"source's names carry a wrapper prefix \('{attr}\.' from {hint}.*unwrapped"):
        sslkernels.ema_update_(target, _Wrapped(attr, source), 0.9)
    with pytest.raises(ValueError, match=rf"target's names carry a wrapper prefix \('{attr}\.'"):
        sslkernels.ema_update_(_Wrapped(attr, target), source, 0.9)
    _assert_unchanged(target, saved)
    # Two unrelated architectures: which side has which names, no wrapper hint.
    only = r"only the target has \['3\.bias', '3\.weight'\], only the source has \[\]"
    with pytest.raises(ValueError, match=only) as err:
        sslkernels.ema_update_(target, nn.Sequential(*list(_net())[:3]), 0.9)
    assert "wrapper" not in str(err.value)


@pytest.mark.parametrize("buffers", ["copy", "ema", "skip"])
def test_ema_update_modules_copies_buffers_with_foreach(monkeypatch, buffers):
    # One grouped foreach copy per (device, dtype) group instead of a copy_ per buffer; same values.
    calls = []
    real = torch._foreach_copy_

    def spy(ts, ss, *a, **k):
        calls.append(len(ts))
        return real(ts, ss, *a, **k)

    target = nn.Sequential(*[nn.BatchNorm1d(5) for _ in range(6)])
    source = copy.deepcopy(target).to(torch.bfloat16)
    with torch.no_grad():
        for k, b in source.named_buffers():
            b.copy_(torch.randn(b.shape) * 3 if b.is_floating_point() else torch.randint(0, 99, b.shape))
    monkeypatch.setattr(torch, "_foreach_copy_", spy)
    sslkernels.ema_update_(target, source, 0.9, buffers=buffers)
    s_bufs = dict(source.named_buffers())
    for k, b in target.named_buffers():
        if not b.is_floating_point():
            assert torch.equal(b, s_bufs[k]), k
        elif buffers == "copy":
            assert torch.equal(b, s_bufs[k].float()), k
    # copy: fp32 <- bf16 running stats in one group, int64 counters in another; otherwise the counters only.
    assert sorted(calls) == ([6, 12] if buffers == "copy" else [6])



def _ema_step_checked(target, source, backend, buffers="copy"):
    """One module-form ema_update_ against float64 arithmetic on the tensors the modules hold right now."""
    t0 = {k: v.detach().double().clone() for k, v in target.named_parameters()}
    s0 = {k: v.detach().double().clone() for k, v in source.named_parameters()}
    sslkernels.ema_update_(target, source, 0.75, backend=backend, buffers=buffers)
    for k, p in target.named_parameters():
        assert_close(p, 0.75 * t0[k] + 0.25 * s0[k], p.dtype, name=k)
    s_bufs = dict(source.named_buffers())
    for k, b in target.named_buffers():
        if buffers == "copy" or not b.is_floating_point():
            assert torch.equal(b, s_bufs[k].to(b.dtype)), f"buffer {k} not copied"


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_ema_update_modules_sees_every_change_between_calls(backend):
    # The module form keeps its walk of both trees between calls (host time): every way a tree can change
    # under the same module objects must reach the update, including writes that bypass registration hooks.
    target, source = _net(), _perturbed_copy(_net())
    _ema_step_checked(target, source, backend)
    _ema_step_checked(target, source, backend)  # the kept walk
    target[3], source[3] = nn.Linear(13, 3), nn.Linear(13, 3)  # swapped layers
    _ema_step_checked(target, source, backend)
    # The replaced objects stay alive here (an optimizer still lists them, say): only identities tell.
    held = list(target.parameters()) + list(source.parameters())
    with torch.no_grad():  # new Parameter objects written straight into the dicts, as _apply can
        target[0]._parameters["weight"] = nn.Parameter(target[0].weight + 1)
        source[0]._parameters["bias"] = nn.Parameter(torch.randn(13))
    _ema_step_checked(target, source, backend)
    held += list(target.parameters())
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        target.double()  # new Parameter objects for every parameter, no registration hook called
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
    _ema_step_checked(target, source, backend)
    assert all(p.dtype == torch.float32 for p in held)
    target[1].register_buffer("extra", torch.zeros(13))
    source[1].register_buffer("extra", torch.randn(13))
    _ema_step_checked(target, source, backend)
    del target[1].extra
    with pytest.raises(ValueError, match=r"only the source has \['1\.extra'\]"):
        sslkernels.ema_update_(target, source, 0.75, backend=backend)
    del source[1].extra
    for net in (target, source):  # a parametrization moves the weight under parametrizations.weight.original
        torch.nn.utils.parametrize.register_parametrization(net[3], "weight", nn.Identity())
    _ema_step_checked(target, source, backend)
    assert any(k.endswith("original") for k, _ in target.named_parameters())
    source[0] = nn.Linear(7, 13, bias=False)  # a parameter gone on one side only
    with pytest.raises(ValueError, match=r"only the target has \['0\.bias'\]"):
        sslkernels.ema_update_(target, source, 0.75, backend=backend)


def test_ema_update_modules_keeps_no_model_alive():
    import gc
    import weakref

    target, source = _net(), _perturbed_copy(_net())
    sslkernels.ema_update_(target, source, 0.9)
    refs = [weakref.ref(x) for x in (target, source, target[3].weight, source[3].bias, source[1].running_mean)]
    # A parameter replaced between calls is freed at once, not when the next call finds the change.
    replaced = weakref.ref(target[0].weight)
    target[0].weight = nn.Parameter(torch.randn(13, 7))
    gc.collect()
    assert replaced() is None, "a module walk entry kept a replaced parameter alive"
    del target, source
    gc.collect()
    assert all(r() is None for r in refs), "a module walk entry kept a model's tensors alive"



class _ValueEqual(nn.Sequential):
    """Modules equal by value: the walk's cache must tell equal modules apart."""

    def __eq__(self, other):
        return isinstance(other, _ValueEqual) and len(self) == len(other)

    def __hash__(self):
        return len(self)


def test_ema_update_modules_equal_by_value_are_told_apart():
    target = _ValueEqual(nn.Linear(7, 13), nn.BatchNorm1d(13), nn.ReLU(), nn.Linear(13, 3))
    source = _ValueEqual(*_perturbed_copy(nn.Sequential(*target)))
    other = _ValueEqual(*_perturbed_copy(nn.Sequential(*target)))  # equal to source by __eq__, not the same
    for src in (source, source, other, source):
        _ema_step_checked(target, src, "auto")

class _ListedParams(nn.Module):
    """Names its tensors from a plain list, not its dicts (as wrappers that override the walk do)."""

    def __init__(self, n):
        super().__init__()
        self.listed = [nn.Parameter(torch.randn(3)) for _ in range(n)]

    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        return iter([(f"p{i}", p) for i, p in enumerate(self.listed)])


def test_ema_update_torchscript_modules():
    # A scripted module's parameter dicts are views of its C++ object: walked every call, as before the kept walk.
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated in recent torch
        target, source = torch.jit.script(_net()), torch.jit.script(_perturbed_copy(_net()))
    for _ in range(2):
        _ema_step_checked(target, source, "auto")


def test_ema_update_modules_walks_overriding_modules_every_call():
    target, source = _ListedParams(2), _ListedParams(2)
    _ema_step_checked(target, source, "auto")
    target.listed[1], source.listed[1] = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    _ema_step_checked(target, source, "auto")  # no dict changed: only a fresh walk sees the new tensors


def test_memory_queue_load_reports_a_size_mismatch_before_ptr():
    a = MemoryQueue(10, 4)
    a.enqueue_(torch.randn(8, 4))  # ptr = 8: outside a 5-row queue, but the size is the cause
    for other in (MemoryQueue(5, 4), MemoryQueue(10, 3)):
        with pytest.raises(RuntimeError, match="size mismatch") as err:
            other.load_state_dict(a.state_dict())
        assert str(tuple(a.queue.shape)) in str(err.value) and str(tuple(other.queue.shape)) in str(err.value)
        assert "outside" not in str(err.value)


def test_momentum_encoder_refuses_a_bad_step_in_a_checkpoint_and_a_bad_tensor_momentum():
    # A float step was truncated into the long buffer and a negative one put the cosine before its start
    # (momentum_at(-5) of 10 steps = the value at +5), both silently; MemoryQueue checks its ptr the same way.
    enc = MomentumEncoder(nn.Linear(3, 3), 0.99, total_steps=10)
    good = enc.state_dict()
    for step, pattern in ((torch.tensor(1.5), "expected a 0-d integer tensor"), (torch.tensor(-5), "is negative")):
        with pytest.raises(RuntimeError, match=pattern):
            enc.load_state_dict({**good, "step": step})
    assert int(enc.step) == 0
    enc.load_state_dict({**good, "step": torch.tensor(4)})
    assert int(enc.step) == 4
    # A tensor momentum is not read in the step (no sync), so it is read once at construction.
    with pytest.raises(ValueError, match=r"^momentum must be in \[0, 1\], got 1.5"):
        MomentumEncoder(nn.Linear(3, 3), torch.tensor(1.5))
    with pytest.raises(ValueError, match=r"^final_momentum must be in \[0, 1\]"):
        MomentumEncoder(nn.Linear(3, 3), final_momentum=torch.tensor(-0.5))
    with pytest.raises(TypeError, match="^module must be an nn.Module"):  # was "target and source must both be ..."
        enc.update_("student")
