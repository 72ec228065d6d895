"""Backend selection (shared/API.md "Backends"): the backend= argument, SSLKERNELS_BACKEND, set_backend /
get_backend, clear errors for backends that cannot run, and backend="triton" on CPU tensors under
TRITON_INTERPRET=1 (conftest sets it on machines without a GPU) for every op that has a Triton kernel."""
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close

import sslkernels
from sslkernels import backends
from sslkernels.backends import available

from test_contrastive_api import (check, expected_clip, expected_info_nce, expected_moco, expected_nt_xent,
                                  expected_siglip, expected_supcon, leaves)
from test_objectives_api import (expected_barlow, expected_dino, expected_neg_cos, expected_sinkhorn,
                                 expected_vicreg)
from test_similarity_api import expected_rankme, expected_similarity

F64, F32 = torch.float64, torch.float32
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _clean_backend_state(monkeypatch):
    monkeypatch.delenv("SSLKERNELS_BACKEND", raising=False)
    sslkernels.set_backend(None)
    yield
    sslkernels.set_backend(None)


def _unit(n, d, dtype=F32):
    return F.normalize(torch.randn(n, d, dtype=F64), dim=1).to(dtype)


# ------------------------------------------------------------------------- selection


def test_default_is_auto():
    assert sslkernels.get_backend() == "auto"


@pytest.mark.parametrize("name", ["auto", "triton", "cuda", "torch"])
def test_set_backend_round_trip(name):
    sslkernels.set_backend(name)
    assert sslkernels.get_backend() == name
    sslkernels.set_backend(None)
    assert sslkernels.get_backend() == "auto"


def test_env_var(monkeypatch):
    monkeypatch.setenv("SSLKERNELS_BACKEND", "torch")
    assert sslkernels.get_backend() == "torch"
    assert backends.resolve("info_nce", None, CPU) == "torch"
    sslkernels.set_backend("auto")  # set_backend wins over the environment
    assert sslkernels.get_backend() == "auto"
    sslkernels.set_backend(None)  # and None hands back to it
    assert sslkernels.get_backend() == "torch"


def test_env_var_invalid_name(monkeypatch):
    monkeypatch.setenv("SSLKERNELS_BACKEND", "tensorflow")
    with pytest.raises(ValueError, match="SSLKERNELS_BACKEND"):
        sslkernels.get_backend()
    with pytest.raises(ValueError, match="SSLKERNELS_BACKEND"):
        sslkernels.info_nce(_unit(3, 4), _unit(3, 4))


@pytest.mark.parametrize("bad,exc", [("tensorflow", ValueError), ("", ValueError), (1, TypeError)])
def test_set_backend_invalid(bad, exc):
    with pytest.raises(exc, match="backend"):
        sslkernels.set_backend(bad)
    assert sslkernels.get_backend() == "auto"


def test_set_backend_is_used_and_argument_overrides_it():
    q, k = _unit(5, 4), _unit(5, 4)
    sslkernels.set_backend("torch")
    assert backends.resolve("info_nce", None, CPU) == "torch"
    want = expected_info_nce(q.double(), k.double(), 0.1)
    assert_close(sslkernels.info_nce(q, k), want, F32)
    sslkernels.set_backend("cuda")  # cannot run CPU tensors ...
    with pytest.raises(ValueError, match="cuda"):
        sslkernels.info_nce(q, k)
    assert_close(sslkernels.info_nce(q, k, backend="torch"), want, F32)  # ... unless the call says otherwise
    assert_close(sslkernels.info_nce(q, k, backend="auto"), want, F32)


def test_env_var_is_used(monkeypatch):
    monkeypatch.setenv("SSLKERNELS_BACKEND", "cuda")
    q, k = _unit(5, 4), _unit(5, 4)
    with pytest.raises(ValueError, match="cuda"):
        sslkernels.info_nce(q, k)
    assert_close(sslkernels.info_nce(q, k, backend="torch"), expected_info_nce(q.double(), k.double(), 0.1), F32)


ALL_OPS = ["info_nce", "nt_xent", "clip_loss", "siglip_loss", "moco_loss", "supcon_loss",
           "negative_cosine_similarity", "dino_loss", "update_center_", "sinkhorn_knopp", "barlow_twins_loss",
           "vicreg_loss", "ema_update_", "similarity", "knn_topk", "rankme", "queue_enqueue_"]


@pytest.mark.parametrize("op", ALL_OPS)
def test_auto_on_cpu_is_never_a_gpu_kernel(op):
    # "auto" on CPU tensors: the memory-efficient PyTorch path where there is one, else the eager one,
    # even with TRITON_INTERPRET set.
    assert "torch" in available(op)
    assert backends.resolve(op, "auto", CPU) in ("cpu", "torch")
    assert backends.resolve(op, "torch", CPU) == "torch"


# ------------------------------------------------------------------------- every op under a backend


def _cases():
    """op -> run(backend) that calls the public API and checks the result against float64 math."""

    def info_nce(b):
        q, q64 = leaves(_unit(13, 7, F64), F32)
        k, k64 = leaves(_unit(13, 7, F64), F32)
        tau, tau64 = leaves(0.1 * (0.5 + torch.rand(13, dtype=F64)), F32)
        out = sslkernels.info_nce(q, k, tau, reduction="none", backend=b)
        check(out, expected_info_nce(q64, k64, tau64, reduction="none"), [q, k, tau], [q64, k64, tau64], F32)

    def nt_xent(b):
        z1, z1_64 = leaves(_unit(13, 7, F64), F32)
        z2, z2_64 = leaves(_unit(13, 7, F64), F32)
        out = sslkernels.nt_xent(z1, z2, 0.5, backend=b)
        check(out, expected_nt_xent(z1_64, z2_64, 0.5), [z1, z2], [z1_64, z2_64], F32)

    def clip_loss(b):
        i, i64 = leaves(_unit(13, 7, F64), F32)
        t, t64 = leaves(_unit(13, 7, F64), F32)
        s, s64 = leaves(torch.tensor(14.3, dtype=F64), F32)
        out = sslkernels.clip_loss(i, t, s, backend=b)
        check(out, expected_clip(i64, t64, s64), [i, t, s], [i64, t64, s64], F32)

    def siglip_loss(b):
        i, i64 = leaves(_unit(13, 7, F64), F32)
        t, t64 = leaves(_unit(13, 7, F64), F32)
        s, s64 = leaves(torch.tensor(10.0, dtype=F64), F32)
        bias, bias64 = leaves(torch.tensor(-10.0, dtype=F64), F32)
        out = sslkernels.siglip_loss(i, t, s, bias, backend=b)
        check(out, expected_siglip(i64, t64, s64, bias64), [i, t, s, bias], [i64, t64, s64, bias64], F32)

    def moco_loss(b):
        q, q64 = leaves(_unit(13, 7, F64), F32)
        k, k64 = leaves(_unit(13, 7, F64), F32)
        queue = _unit(37, 7)
        out = sslkernels.moco_loss(q, k, queue, 0.2, backend=b)
        check(out, expected_moco(q64, k64, queue.double(), 0.2), [q, k], [q64, k64], F32)

    def supcon_loss(b):
        f, f64 = leaves(_unit(13, 7, F64), F32)
        labels = torch.randint(0, 4, (13,))
        labels[-1] = 7
        out = sslkernels.supcon_loss(f, labels, 0.1, backend=b)
        check(out, expected_supcon(f64, labels, 0.1), [f], [f64], F32)

    def negative_cosine_similarity(b):
        p, p64 = leaves(torch.randn(13, 7, dtype=F64), F32)
        z = torch.randn(13, 7)
        out = sslkernels.negative_cosine_similarity(p, z, backend=b)
        check(out, expected_neg_cos(p64, z.double()), [p], [p64], F32)

    def dino_loss(b):
        s, s64 = leaves(torch.randn(4 * 5, 11, dtype=F64), F32)
        t, c = torch.randn(2 * 5, 11), torch.randn(1, 11) * 0.1
        out = sslkernels.dino_loss(s, t, c, backend=b)
        check(out, expected_dino(s64, t.double(), c.double(), 0.1, 0.04, 2), [s], [s64], F32)

    def update_center_(b):
        c, t = torch.randn(1, 11), torch.randn(10, 11)
        want = 0.9 * c.double() + 0.1 * t.double().mean(0, keepdim=True)
        sslkernels.update_center_(c, t, 0.9, backend=b)
        assert_close(c, want, F32)

    def sinkhorn_knopp(b):
        scores = _unit(13, 7)
        assert_close(sslkernels.sinkhorn_knopp(scores, backend=b), expected_sinkhorn(scores.double(), 0.05, 3), F32)

    def barlow_twins_loss(b):
        z1, z1_64 = leaves(torch.randn(13, 7, dtype=F64), F32)
        z2, z2_64 = leaves(torch.randn(13, 7, dtype=F64), F32)
        out = sslkernels.barlow_twins_loss(z1, z2, backend=b)
        check(out, expected_barlow(z1_64, z2_64), [z1, z2], [z1_64, z2_64], F32)

    def vicreg_loss(b):
        z1, z1_64 = leaves(torch.randn(13, 7, dtype=F64), F32)
        z2, z2_64 = leaves(torch.randn(13, 7, dtype=F64), F32)
        out = sslkernels.vicreg_loss(z1, z2, backend=b)
        check(out, expected_vicreg(z1_64, z2_64), [z1, z2], [z1_64, z2_64], F32)

    def ema_update_(b):
        t, s = [torch.randn(13, 7), torch.randn(5)], [torch.randn(13, 7).bfloat16(), torch.randn(5).bfloat16()]
        want = [0.99 * x.double() + 0.01 * y.double() for x, y in zip(t, s)]
        sslkernels.ema_update_(t, s, 0.99, backend=b)
        for x, w in zip(t, want):
            assert_close(x, w, F32)

    def similarity(b):
        a, a64 = leaves(torch.randn(13, 7, dtype=F64), F32)
        c, c64 = leaves(torch.randn(29, 7, dtype=F64), F32)
        out = sslkernels.similarity(a, c, backend=b)
        check(out, expected_similarity(a64, c64, True), [a, c], [a64, c64], F32)

    def knn_topk(b):
        q, bank = torch.randn(13, 7), torch.randn(50, 7)
        v, i = sslkernels.knn_topk(q, bank, 5, backend=b)
        full = expected_similarity(q.double(), bank.double(), True)
        assert_close(v, full.topk(5, dim=1).values, F32)
        assert_close(v, full.gather(1, i), F32)

    def rankme(b):
        z = torch.randn(20, 6)
        assert_close(torch.tensor(sslkernels.rankme(z, backend=b)), torch.tensor(expected_rankme(z)), F32)

    def queue_enqueue_(b):
        q = sslkernels.MemoryQueue(10, 7)
        ring, ptr = list(q.queue.clone()), 0
        for n in (3, 9, 14):
            keys = torch.randn(n, 7)
            q.enqueue_(keys, backend=b)
            for r in keys:  # the obvious ring: one row at a time
                ring[ptr], ptr = r, (ptr + 1) % 10
        assert torch.equal(q.queue, torch.stack(ring)) and int(q.ptr) == ptr

    return dict(locals())


CASES = _cases()
assert sorted(CASES) == sorted(ALL_OPS)


@pytest.mark.parametrize("op", ALL_OPS)
def test_backend_torch_and_auto(op):
    CASES[op]("torch")
    CASES[op]("auto")
    CASES[op](None)


@pytest.mark.parametrize("op", ALL_OPS)
def test_backend_triton_on_cpu(op):
    """Runs where a Triton kernel exists (interpreted on CPU); otherwise a ValueError naming triton."""
    if "triton" in available(op) and backends._usable("triton", CPU):
        CASES[op]("triton")
    else:
        with pytest.raises(ValueError, match="triton"):
            CASES[op]("triton")


@pytest.mark.parametrize("op", ALL_OPS)
def test_backend_cuda_on_cpu_tensors_raises(op):
    with pytest.raises(ValueError, match="cuda"):
        CASES[op]("cuda")


def test_dispatch_makes_the_tensors_cuda_device_current(monkeypatch):
    # Triton and csrc launch on the current device: an op on cuda:1 tensors under a current cuda:0 runs with
    # cuda:1 made current (checked here without a GPU: the CUDA device calls are stand-ins).
    import contextlib

    from sslkernels import backends

    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(torch.device(d))
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setitem(backends._registry, "_probe", {"torch": lambda x: ("ran", x)})
    assert backends.dispatch("_probe", "torch", torch.device("cuda", 1))(7) == ("ran", 7)
    assert entered == [torch.device("cuda", 1)]
    assert backends.dispatch("_probe", "torch", torch.device("cuda", 0))(8) == ("ran", 8)
    assert backends.dispatch("_probe", "torch", torch.device("cpu"))(9) == ("ran", 9)
    assert entered == [torch.device("cuda", 1)], "the current device (or the CPU) needs no switch"
