"""Losses under torch.autocast: they run in their inputs' precision (as F.cross_entropy does), not in
autocast's bf16 matmuls; bf16 features are accepted and the loss is accumulated in fp32."""
import pytest
import torch
import torch.nn.functional as F

import sslkernels

N, D, P = 24, 16, 40


def _cases(g):
    def feats(n=N, d=D):
        return F.normalize(torch.randn(n, d, generator=g), dim=1)
    labels = torch.randint(0, 4, (N,), generator=g)
    return {
        "info_nce": (lambda a, b: sslkernels.info_nce(a, b, temperature=0.07), (feats(), feats())),
        "info_nce_symmetric": (lambda a, b: sslkernels.info_nce(a, b, temperature=0.07, symmetric=True),
                               (feats(), feats())),
        "nt_xent": (lambda a, b: sslkernels.nt_xent(a, b, temperature=0.1), (feats(), feats())),
        "clip_loss": (lambda a, b: sslkernels.clip_loss(a, b, logit_scale=30.0), (feats(), feats())),
        "siglip_loss": (lambda a, b: sslkernels.siglip_loss(a, b, logit_scale=10.0, logit_bias=-5.0),
                        (feats(), feats())),
        "moco_loss": (lambda a, b, q: sslkernels.moco_loss(a, b, q, temperature=0.2), (feats(), feats(), feats(3 * N))),
        "supcon_loss": (lambda a: sslkernels.supcon_loss(a, labels, temperature=0.1), (feats(),)),
        "dino_loss": (lambda s, t: sslkernels.dino_loss(s, t, torch.zeros(1, P), n_global_crops=2),
                      (torch.randn(4 * N, P, generator=g), torch.randn(2 * N, P, generator=g))),
        "barlow_twins_loss": (lambda a, b: sslkernels.barlow_twins_loss(a, b), (feats(), feats())),
        "vicreg_loss": (lambda a, b: sslkernels.vicreg_loss(a, b), (feats(), feats())),
        "negative_cosine_similarity": (lambda a, b: sslkernels.negative_cosine_similarity(a, b), (feats(), feats())),
    }


def _loss_and_grads(fn, inputs):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    loss = fn(*xs)
    loss.backward()
    return loss.detach(), [x.grad for x in xs]


@pytest.mark.parametrize("name", sorted(_cases(torch.Generator().manual_seed(0))))
def test_fp32_features_stay_fp32_under_autocast(name):
    fn, inputs = _cases(torch.Generator().manual_seed(11))[name]
    plain, plain_grads = _loss_and_grads(fn, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, auto_grads = _loss_and_grads(fn, inputs)
    assert auto.dtype == torch.float32
    # bf16 matmuls would move the loss by ~1e-3 relative; the inputs' own precision keeps it to rounding.
    torch.testing.assert_close(auto, plain, rtol=1e-6, atol=1e-7)
    for a, p in zip(auto_grads, plain_grads):
        if p is not None:
            torch.testing.assert_close(a, p, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(_cases(torch.Generator().manual_seed(0))))
def test_bf16_features_accumulate_in_fp32_under_autocast(name):
    fn, inputs = _cases(torch.Generator().manual_seed(12))[name]
    bf16 = [x.to(torch.bfloat16) for x in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(fn, bf16)
    exact = fn(*[x.double() for x in bf16])  # the same bf16 values, float64 math
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=1e-6)
    for gr, x in zip(grads, bf16):
        if gr is not None:
            assert gr.dtype == torch.bfloat16 and torch.isfinite(gr).all()
