"""SwaV (lightly's SwaVLoss: Sinkhorn codes of each high-resolution crop, predicted by every other crop) on
the DINO kernels (Triton under the interpreter, and the CPU path) and the eager reference, against float64
math written here. Values and the gradients of every crop."""

import pytest
import torch

import sslkernels.functional as Fn
from conftest import HAS_CUDA, assert_close
from sinkhorn_oracle import sinkhorn64
from sslkernels import reference

pytest.importorskip("triton")
from sslkernels.ops import dino, dino_cpu, sinkhorn  # noqa: E402

KINDS = {"triton": dino.swav_loss, "cpu": dino_cpu.swav_loss, "torch": reference.swav_loss}
DEVICE = {"triton": "cuda" if HAS_CUDA else "cpu", "cpu": "cpu", "torch": "cpu"}


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    monkeypatch.setattr(dino, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(dino, "TARGET_PROGRAMS", 8)
    monkeypatch.setattr(sinkhorn, "BLOCK_B", 4)
    monkeypatch.setattr(sinkhorn, "BLOCK_P", 16)
    monkeypatch.setattr(dino_cpu, "CHUNK_ELEMENTS", 100)


def swav64(high, low, temperature, epsilon, iterations, queue=None):
    """lightly's SwaVLoss.forward, in float64."""
    crops = [z.double() for z in high + low]
    loss = 0.0
    for i in range(len(high)):
        scores = crops[i].detach()
        if queue is not None:
            scores = torch.cat([scores, queue[i].double()])
        q = sinkhorn64(scores, epsilon, iterations)[:crops[i].shape[0]]
        sub = 0.0
        for v, z in enumerate(crops):
            if v != i:
                sub = sub - torch.mean(torch.sum(q * torch.log_softmax(z / temperature, dim=1), dim=1))
        loss = loss + sub / (len(crops) - 1)
    return loss / len(high)


def check(kind, n_high, n_low, b, p, *, dtype=torch.float32, iterations=3, k=0, scale=1.0, epsilon=0.05,
          temperature=0.1):
    crops = [(torch.nn.functional.normalize(torch.randn(b, p), dim=1) * scale).to(dtype)
             for _ in range(n_high + n_low)]
    queue = [torch.randn(k, p).to(dtype) * scale for _ in range(n_high)] if k else None
    leaves64 = [z.double().requires_grad_() for z in crops]
    want = swav64(leaves64[:n_high], leaves64[n_high:], temperature, epsilon, iterations, queue)
    # With one high-resolution crop it predicts nothing: no gradient (zeros on the fused paths).
    want_grads = [torch.zeros_like(z) if g is None else g
                  for z, g in zip(leaves64, torch.autograd.grad(want, leaves64, allow_unused=True))]
    dev = DEVICE[kind]
    leaves = [z.to(dev).requires_grad_() for z in crops]
    q = None if queue is None else [x.to(dev) for x in queue]
    got = KINDS[kind](leaves[:n_high], leaves[n_high:], temperature, epsilon, iterations, q, False, None)
    grads = [torch.zeros_like(z) if g is None else g
             for z, g in zip(leaves, torch.autograd.grad(got, leaves, allow_unused=True))]
    assert got.dim() == 0
    assert_close(got, want, dtype, name="loss")
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        assert g.dtype == dtype
        assert_close(g, w, dtype, atol=0.0, name=f"grad of crop {i}")


@pytest.mark.parametrize("kind", ["triton", "cpu", "torch"])
@pytest.mark.parametrize("n_high,n_low,b,p", [(2, 4, 3, 37), (2, 0, 5, 9), (1, 1, 1, 16)])
def test_swav_matches_float64(kind, n_high, n_low, b, p):
    check(kind, n_high, n_low, b, p)


@pytest.mark.parametrize("kind", ["triton", "cpu", "torch"])
def test_swav_queue_and_iterations(kind):
    check(kind, 2, 2, 3, 21, k=6)
    check(kind, 2, 1, 4, 11, iterations=0)  # no per-sample normalization: the eager fallback
    check(kind, 2, 1, 4, 11, iterations=1, epsilon=0.3, temperature=0.2)


@pytest.mark.parametrize("kind", ["triton", "cpu"])
def test_swav_fp16_and_extreme_scores(kind):
    check(kind, 2, 2, 3, 19, dtype=torch.float16)
    # Scores ×100 over ε = 0.05: exponents of 2000, past even float64's exp (the literal SwAV code overflows).
    check(kind, 2, 2, 3, 19, scale=100.0)


def test_swav_public_api_and_module():
    from sslkernels import nn as snn

    crops = [torch.nn.functional.normalize(torch.randn(4, 13), dim=1).requires_grad_() for _ in range(5)]
    queue = [torch.randn(8, 13), torch.randn(8, 13)]
    want = swav64([z.detach() for z in crops[:2]], [z.detach() for z in crops[2:]], 0.1, 0.05, 3, queue)
    for backend in ("auto", "torch", "triton"):
        assert_close(Fn.swav_loss(crops[:2], crops[2:], queue_outputs=queue, backend=backend), want, torch.float32)
    module = snn.SwaVLoss(0.2, 2, 0.1, False)  # lightly's positional order
    out = module(crops[:2], crops[2:])
    assert out.shape == (1,)  # lightly's SwaVLoss returns shape [1]
    out.backward()
    assert_close(out[0], swav64([z.detach() for z in crops[:2]], [z.detach() for z in crops[2:]], 0.2, 0.1, 2),
                 torch.float32)
    assert all(z.grad is not None for z in crops)
    assert_close(module.subloss(crops[2].detach(), torch.full((4, 13), 1 / 13)),
                 -(torch.log_softmax(crops[2].detach().double() / 0.2, dim=1) / 13).sum(dim=1).mean(), torch.float32)


@pytest.mark.parametrize("call,exc,match", [
    (lambda z: Fn.swav_loss(z, [z]), TypeError, "high_resolution_outputs"),
    (lambda z: Fn.swav_loss([], [z]), ValueError, "high_resolution_outputs"),
    (lambda z: Fn.swav_loss([z], []), ValueError, "two crops"),
    (lambda z: Fn.swav_loss([z], [z[:2]]), ValueError, r"low_resolution_outputs\[0\]"),
    (lambda z: Fn.swav_loss([z], [z], queue_outputs=[]), ValueError, "queue_outputs"),
    (lambda z: Fn.swav_loss([z, z], [z], queue_outputs=[z[:, :3]]), ValueError, "queue_outputs"),
    (lambda z: Fn.swav_loss([z], [z], temperature=0.0), ValueError, "temperature"),
    (lambda z: Fn.swav_loss([z], [z], epsilon=-1.0), ValueError, "epsilon"),
    (lambda z: Fn.swav_loss([z], [z], iterations=1.5), ValueError, "iterations"),
    (lambda z: Fn.swav_loss([z], [z.long()]), TypeError, r"low_resolution_outputs\[0\]"),
])
def test_swav_bad_inputs_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(4, 6))


def test_swav_has_an_implementation_per_backend():
    # swav_loss dispatches like every op: torch (eager), cpu (auto on CPU tensors), triton; no csrc kernel,
    # so backend="cuda" is refused with the reason rather than silently switched.
    from sslkernels.backends import available

    assert {"torch", "cpu", "triton"} <= set(available("swav_loss"))
    z = [torch.randn(3, 8) for _ in range(3)]
    with pytest.raises(ValueError, match="cuda"):
        Fn.swav_loss(z[:2], z[2:], backend="cuda")
