"""MemoryQueue's enqueue kernels (Triton under the interpreter, and the eager path) against a row-by-row
model of the ring buffer written in the test."""
import pytest
import torch
import torch.nn.functional as F

import sslkernels
from sslkernels.backends import available


def ring_model(queue, ptr, keys, normalize):
    """Write every row in order, one at a time: the definition the fused kernel must match."""
    q = queue.clone().to(torch.float64)
    p = int(ptr)
    for row in keys.to(torch.float64):
        q[p] = F.normalize(row, dim=0) if normalize else row
        p = (p + 1) % q.shape[0]
    return q, p


@pytest.mark.parametrize("kind", ["torch", "triton"])
@pytest.mark.parametrize("batch", [1, 3, 10, 17, 31])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_enqueue_matches_ring_model(kind, batch, normalize, dtype):
    size, dim, start = 10, 7, 6
    queue = torch.randn(size, dim).to(dtype)
    ptr = torch.tensor(start)
    keys = torch.randn(batch, dim) * 3
    want, want_ptr = ring_model(queue, ptr, keys, normalize)
    available("queue_enqueue_")[kind](queue, ptr, keys.to(dtype), normalize)
    assert int(ptr) == want_ptr
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(queue.to(torch.float64), want.to(dtype).to(torch.float64), rtol=tol, atol=tol)


def test_memory_queue_wraps_and_round_trips_state():
    q = sslkernels.MemoryQueue(8, 5)
    assert q.ptr.dtype == torch.long and q.ptr.dim() == 0 and q.ptr.device == q.queue.device
    for b in (3, 3, 3, 11):
        before = q.queue.clone()
        want, want_ptr = ring_model(before, q.ptr, k := torch.randn(b, 5), False)
        q.enqueue_(k)
        torch.testing.assert_close(q.queue.double(), want)
        assert int(q.ptr) == want_ptr
    other = sslkernels.MemoryQueue(8, 5)
    other.load_state_dict(q.state_dict())
    assert torch.equal(other.queue, q.queue) and torch.equal(other.ptr, q.ptr)


def test_memory_queue_rejects_bad_keys():
    q = sslkernels.MemoryQueue(8, 5)
    with pytest.raises(ValueError, match="dimension"):
        q.enqueue_(torch.randn(2, 4))
    with pytest.raises(ValueError, match="keys"):
        q.enqueue_(torch.randn(0, 5))
    with pytest.raises(TypeError, match="keys"):
        q.enqueue_(torch.ones(2, 5, dtype=torch.long))


def test_memory_queue_plugs_into_moco_loss():
    q = sslkernels.MemoryQueue(16, 6, dtype=torch.float64)
    query, key = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    assert torch.equal(sslkernels.moco_loss(query, key, q), sslkernels.moco_loss(query, key, q.queue))
