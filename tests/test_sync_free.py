"""A full MoCo v2 step (two encoder forwards, moco_loss against the queue, backward, SGD, EMA of the key
encoder, enqueue) must never bring a tensor's value to the host: that is what lets it run without
device synchronizations and be captured in a CUDA graph."""

import pytest
import torch
import torch.nn.functional as F

import sslkernels
from conftest import HAS_CUDA, forbid_host_reads


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
    with forbid_host_reads():
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
    with forbid_host_reads():
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
    with forbid_host_reads():
        for _ in range(3):  # 0 -> 24 -> 0 (16 of 24 rows fit) -> 24
            loss = loss_fn(encoder(x1), encoder(x2))
            loss.backward()
    assert torch.isfinite(loss).all() and int(loss_fn.memory_bank.bank_ptr) == 24


def test_forbid_host_reads_catches_item():
    with forbid_host_reads(), pytest.raises(AssertionError, match="host read"):
        torch.ones(()).item()


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
