"""Comparison helpers of the drop-in tests (tests/test_dropin_*.py): ours against the original package."""
import torch

RTOL = 1e-5  # fp32 drop-ins: max |ours − original| / max |original| per tensor


def max_rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest elementwise difference relative to the largest magnitude of ``ref`` (entries near zero are not
    held to an elementwise relative bound). A NaN or Inf on either side fails."""
    a, b = ours.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != original's {tuple(b.shape)}"
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), "non-finite values"
    scale = b.abs().max().item() if b.numel() else 0.0
    err = (a - b).abs().max().item() if b.numel() else 0.0
    if scale == 0.0:
        return 0.0 if err == 0.0 else float("inf")
    return err / scale


def assert_matches(ours: torch.Tensor, ref: torch.Tensor, name: str, rtol: float = RTOL) -> None:
    d = max_rel_diff(ours, ref)
    assert d <= rtol, f"{name}: max relative difference {d:.3e} > {rtol:g}"


def grads(loss: torch.Tensor, inputs):
    """d loss / d input for each input (None where the loss does not depend on it)."""
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def assert_same_grads(ours_loss, ref_loss, ours_inputs, ref_inputs, names, rtol: float = RTOL) -> None:
    assert_matches(ours_loss, ref_loss, "loss", rtol)
    for g, h, name in zip(grads(ours_loss, ours_inputs), grads(ref_loss, ref_inputs), names):
        assert (g is None) == (h is None), f"grad of {name}: ours is {g is not None and 'set' or None}, " \
                                           f"the original's is {h is not None and 'set' or None}"
        if g is not None:
            assert_matches(g, h, f"grad of {name}", rtol)


def twin_leaves(*tensors):
    """Two independent sets of leaves with equal values (ours, original), each requiring grad."""
    ours = [t.detach().clone().requires_grad_() for t in tensors]
    ref = [t.detach().clone().requires_grad_() for t in tensors]
    return ours, ref
