"""solo-learn main's loss signatures (not in any installable release, so not comparable with solo's code):
checked against float64 formulas of what those functions compute, values and every gradient."""
import pytest
import torch
import torch.nn.functional as F

from sslkernels.integrations import solo_learn as sl


def _grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    loss = fn(*xs)
    loss.backward()
    return loss.detach(), [x.grad for x in xs]


def _simclr_by_index_f64(z, indexes, t):
    z = F.normalize(z.double(), dim=-1)
    s = torch.exp(z @ z.T / t)
    pos = (indexes[:, None] == indexes[None, :]).double()
    pos.fill_diagonal_(0)
    neg = (indexes[:, None] != indexes[None, :]).double()
    p, n = (s * pos).sum(1), (s * neg).sum(1)
    return -torch.log(p / (p + n)).mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("layout", ["two_views_shuffled", "multi_crop"])
def test_solo_main_simclr_loss_func_indexes(seed, layout):
    g = torch.Generator().manual_seed(seed)
    n = 7
    if layout == "two_views_shuffled":  # SimCLR's two views per image, rows in any order: the fused NT-Xent path
        indexes = torch.arange(n).repeat(2)[torch.randperm(2 * n, generator=g)]
    else:  # 3 crops of each image: the eager multi-positive path
        indexes = torch.arange(n).repeat(3)
    z = torch.randn(indexes.shape[0], 11, generator=g)
    loss, (gz,) = _grads(lambda z: sl.simclr_loss_func(z, indexes, 0.2), z)
    ref, (rz,) = _grads(lambda z: _simclr_by_index_f64(z, indexes, 0.2), z.double())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gz.double(), rz, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_solo_main_mocov2plus_loss_func(seed):
    g = torch.Generator().manual_seed(seed)
    q, k = F.normalize(torch.randn(9, 13, generator=g), dim=1), F.normalize(torch.randn(9, 13, generator=g), dim=1)
    queue = F.normalize(torch.randn(13, 37, generator=g), dim=0)  # D×K

    def ref_fn(q, k):
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.double()], dim=1) / 0.1
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))

    loss, (gq, gk) = _grads(lambda q, k: sl.mocov2plus_loss_func(q, k, queue), q, k)
    ref, (rq, rk) = _grads(ref_fn, q.double(), k.double())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gq.double(), rq, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gk.double(), rk, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_solo_main_mocov3_loss_func(seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(10, 6, generator=g), torch.randn(10, 6, generator=g)

    def ref_fn(q, k):
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.2
        return F.cross_entropy(logits, torch.arange(q.shape[0])) * (2 * 0.2)

    loss, (gq, gk) = _grads(lambda q, k: sl.mocov3_loss_func(q, k), q, k)
    ref, (rq, rk) = _grads(ref_fn, q.double(), k.double())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gq.double(), rq, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gk.double(), rk, rtol=1e-4, atol=1e-6)


def test_solo_main_forms_reject_bad_input():
    z = torch.randn(6, 4)
    with pytest.raises(ValueError, match="indexes"):
        sl.simclr_loss_func(z, torch.arange(5))
    with pytest.raises(TypeError, match="extra_pos_mask"):
        sl.simclr_loss_func(z, torch.arange(6) % 3, 0.1, torch.ones(6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="key has shape"):
        sl.mocov3_loss_func(z, torch.randn(5, 4))
    with pytest.raises(ValueError, match="temperature"):
        sl.mocov3_loss_func(z, z, temperature=0.0)
