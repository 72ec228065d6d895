"""Bad input to the public API raises ValueError / TypeError whose message names the offending argument."""
import pytest
import torch
from torch import nn

from conftest import HAS_CUDA

import sslkernels
from sslkernels import MemoryQueue, MomentumEncoder

F32 = torch.float32


def r(*shape, dtype=F32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


Q, K = r(5, 4), r(5, 4)
LONG = torch.arange(5)

# (id, call, exception, message pattern naming the argument)
CASES = [
    # ---- info_nce: shapes, dims, dtypes
    ("info_nce query 1-d", lambda: sslkernels.info_nce(r(5), K), ValueError, "query"),
    ("info_nce query 3-d", lambda: sslkernels.info_nce(r(5, 4, 1), K), ValueError, "query"),
    ("info_nce key 1-d", lambda: sslkernels.info_nce(Q, r(4)), ValueError, "key"),
    ("info_nce dim mismatch", lambda: sslkernels.info_nce(Q, r(5, 3)), ValueError, "key"),
    ("info_nce dtype mismatch", lambda: sslkernels.info_nce(Q, K.double()), (TypeError, ValueError), "key"),
    ("info_nce integer query", lambda: sslkernels.info_nce(torch.ones(5, 4, dtype=torch.long), K), TypeError, "query"),
    ("info_nce integer key", lambda: sslkernels.info_nce(Q, torch.ones(5, 4, dtype=torch.int32)), TypeError, "key"),
    ("info_nce query not a tensor", lambda: sslkernels.info_nce(Q.tolist(), K), TypeError, "query"),
    ("info_nce empty", lambda: sslkernels.info_nce(r(0, 4), r(0, 4)), ValueError, "query"),
    ("info_nce empty key", lambda: sslkernels.info_nce(Q, r(0, 4), targets=LONG), ValueError, "key"),
    ("info_nce zero-width", lambda: sslkernels.info_nce(r(5, 0), r(5, 0)), ValueError, "query"),
    ("info_nce N != M without targets", lambda: sslkernels.info_nce(Q, r(7, 4)), ValueError, "key|targets"),
    # ---- temperature
    ("info_nce temperature 0", lambda: sslkernels.info_nce(Q, K, 0.0), ValueError, "temperature"),
    ("info_nce temperature < 0", lambda: sslkernels.info_nce(Q, K, -0.1), ValueError, "temperature"),
    ("info_nce temperature nan", lambda: sslkernels.info_nce(Q, K, float("nan")), ValueError, "temperature"),
    ("info_nce temperature inf", lambda: sslkernels.info_nce(Q, K, float("inf")), ValueError, "temperature"),
    ("info_nce tensor temperature 0", lambda: sslkernels.info_nce(Q, K, torch.tensor(0.0)), ValueError, "temperature"),
    ("info_nce tensor temperature < 0", lambda: sslkernels.info_nce(Q, K, torch.tensor(-1.0)), ValueError,
     "temperature"),
    ("info_nce per-anchor temperature <= 0",
     lambda: sslkernels.info_nce(Q, K, torch.tensor([0.1, 0.1, 0.0, 0.1, 0.1])), ValueError, "temperature"),
    ("info_nce per-anchor temperature wrong length", lambda: sslkernels.info_nce(Q, K, torch.full((4,), 0.1)),
     ValueError, "temperature"),
    ("info_nce temperature 2-d", lambda: sslkernels.info_nce(Q, K, torch.full((5, 1), 0.1)), ValueError,
     "temperature"),
    ("info_nce integer tensor temperature", lambda: sslkernels.info_nce(Q, K, torch.tensor(1)), TypeError,
     "temperature"),
    ("info_nce string temperature", lambda: sslkernels.info_nce(Q, K, "0.1"), TypeError, "temperature"),
    # ---- targets
    ("info_nce targets out of range high", lambda: sslkernels.info_nce(Q, K, targets=torch.tensor([0, 1, 2, 3, 5])),
     ValueError, "targets"),
    ("info_nce targets negative", lambda: sslkernels.info_nce(Q, K, targets=torch.tensor([0, 1, -1, 3, 4])),
     ValueError, "targets"),
    ("info_nce targets float", lambda: sslkernels.info_nce(Q, K, targets=LONG.float()), TypeError, "targets"),
    ("info_nce targets bool", lambda: sslkernels.info_nce(Q, K, targets=LONG > 2), TypeError, "targets"),
    ("info_nce targets wrong length", lambda: sslkernels.info_nce(Q, K, targets=torch.arange(4)), ValueError,
     "targets"),
    ("info_nce targets 2-d", lambda: sslkernels.info_nce(Q, K, targets=LONG[:, None]), ValueError, "targets"),
    ("info_nce targets not a tensor", lambda: sslkernels.info_nce(Q, K, targets=[0, 1, 2, 3, 4]), TypeError,
     "targets"),
    # ---- symmetric / decoupled / reduction
    ("info_nce symmetric N != M", lambda: sslkernels.info_nce(Q, r(7, 4), symmetric=True), ValueError, "symmetric"),
    ("info_nce symmetric with targets", lambda: sslkernels.info_nce(Q, K, targets=LONG, symmetric=True),
     ValueError, "symmetric|targets"),
    ("info_nce decoupled single key", lambda: sslkernels.info_nce(r(1, 4), r(1, 4), decoupled=True), ValueError,
     "decoupled"),
    ("info_nce unknown reduction", lambda: sslkernels.info_nce(Q, K, reduction="avg"), ValueError, "reduction"),
    ("info_nce unknown backend", lambda: sslkernels.info_nce(Q, K, backend="numba"), ValueError, "backend"),
    # ---- nt_xent
    ("nt_xent rows differ", lambda: sslkernels.nt_xent(Q, r(6, 4)), ValueError, "z2|z1"),
    ("nt_xent dim mismatch", lambda: sslkernels.nt_xent(Q, r(5, 3)), ValueError, "z2"),
    ("nt_xent 1-d", lambda: sslkernels.nt_xent(r(5), r(5)), ValueError, "z1"),
    ("nt_xent dtype mismatch", lambda: sslkernels.nt_xent(Q, K.double()), (TypeError, ValueError), "z2"),
    ("nt_xent integer", lambda: sslkernels.nt_xent(LONG[:, None], LONG[:, None]), TypeError, "z1"),
    ("nt_xent empty", lambda: sslkernels.nt_xent(r(0, 4), r(0, 4)), ValueError, "z1"),
    ("nt_xent temperature 0", lambda: sslkernels.nt_xent(Q, K, 0.0), ValueError, "temperature"),
    ("nt_xent tensor temperature < 0", lambda: sslkernels.nt_xent(Q, K, torch.tensor(-0.5)), ValueError,
     "temperature"),
    ("nt_xent per-anchor temperature", lambda: sslkernels.nt_xent(Q, K, torch.full((5,), 0.5)), ValueError,
     "temperature"),
    ("nt_xent decoupled N=1", lambda: sslkernels.nt_xent(r(1, 4), r(1, 4), decoupled=True), ValueError, "decoupled"),
    ("nt_xent unknown reduction", lambda: sslkernels.nt_xent(Q, K, reduction="max"), ValueError, "reduction"),
    # ---- clip / siglip
    ("clip rows differ", lambda: sslkernels.clip_loss(Q, r(6, 4), 10.0), ValueError, "text_features"),
    ("clip dim mismatch", lambda: sslkernels.clip_loss(Q, r(5, 3), 10.0), ValueError, "text_features"),
    ("clip 1-d image", lambda: sslkernels.clip_loss(r(4), K, 10.0), ValueError, "image_features"),
    ("clip empty", lambda: sslkernels.clip_loss(r(0, 4), r(0, 4), 10.0), ValueError, "image_features"),
    ("clip logit_scale 0", lambda: sslkernels.clip_loss(Q, K, 0.0), ValueError, "logit_scale"),
    ("clip logit_scale < 0 tensor", lambda: sslkernels.clip_loss(Q, K, torch.tensor(-3.0)), ValueError,
     "logit_scale"),
    ("clip logit_scale 1-d", lambda: sslkernels.clip_loss(Q, K, torch.full((5,), 3.0)), ValueError, "logit_scale"),
    ("clip unknown reduction", lambda: sslkernels.clip_loss(Q, K, 3.0, reduction="Mean"), ValueError, "reduction"),
    ("siglip logit_scale 0", lambda: sslkernels.siglip_loss(Q, K, 0.0, -10.0), ValueError, "logit_scale"),
    ("siglip logit_bias nan", lambda: sslkernels.siglip_loss(Q, K, 10.0, float("nan")), ValueError, "logit_bias"),
    ("siglip logit_bias nan tensor", lambda: sslkernels.siglip_loss(Q, K, 10.0, torch.tensor(float("nan"))),
     ValueError, "logit_bias"),
    ("siglip logit_bias inf tensor", lambda: sslkernels.siglip_loss(Q, K, 10.0, torch.tensor(-float("inf"))),
     ValueError, "logit_bias"),
    ("siglip logit_bias 1-d", lambda: sslkernels.siglip_loss(Q, K, 10.0, torch.zeros(5)), ValueError, "logit_bias"),
    ("siglip logit_bias integer tensor", lambda: sslkernels.siglip_loss(Q, K, 10.0, torch.tensor(-10)), TypeError,
     "logit_bias"),
    ("siglip rows differ", lambda: sslkernels.siglip_loss(Q, r(6, 4), 10.0, -10.0), ValueError, "text_features"),
    # ---- moco
    ("moco rows differ", lambda: sslkernels.moco_loss(Q, r(6, 4), r(9, 4)), ValueError, "key"),
    ("moco key dim mismatch", lambda: sslkernels.moco_loss(Q, r(5, 3), r(9, 4)), ValueError, "key"),
    ("moco queue dim mismatch", lambda: sslkernels.moco_loss(Q, K, r(9, 3)), ValueError, "queue"),
    ("moco queue 1-d", lambda: sslkernels.moco_loss(Q, K, r(9)), ValueError, "queue"),
    ("moco queue integer", lambda: sslkernels.moco_loss(Q, K, torch.ones(9, 4, dtype=torch.long)), TypeError,
     "queue"),
    ("moco temperature 0", lambda: sslkernels.moco_loss(Q, K, r(9, 4), 0.0), ValueError, "temperature"),
    ("moco unknown reduction", lambda: sslkernels.moco_loss(Q, K, r(9, 4), reduction=None), ValueError, "reduction"),
    # ---- supcon
    ("supcon labels wrong length", lambda: sslkernels.supcon_loss(Q, torch.arange(4)), ValueError, "labels"),
    ("supcon labels float", lambda: sslkernels.supcon_loss(Q, LONG.float()), TypeError, "labels"),
    ("supcon labels 2-d", lambda: sslkernels.supcon_loss(Q, LONG[:, None]), ValueError, "labels"),
    ("supcon features 3-d", lambda: sslkernels.supcon_loss(r(5, 2, 2), LONG), ValueError, "features"),
    ("supcon integer features", lambda: sslkernels.supcon_loss(LONG[:, None], LONG), TypeError, "features"),
    ("supcon empty", lambda: sslkernels.supcon_loss(r(0, 4), torch.arange(0)), ValueError, "features"),
    ("supcon temperature < 0", lambda: sslkernels.supcon_loss(Q, LONG, -0.1), ValueError, "temperature"),
    ("supcon unknown reduction", lambda: sslkernels.supcon_loss(Q, LONG, reduction="none "), ValueError,
     "reduction"),
    # ---- non-contrastive
    ("negcos rows differ", lambda: sslkernels.negative_cosine_similarity(Q, r(6, 4)), ValueError, "z|p"),
    ("negcos dim mismatch", lambda: sslkernels.negative_cosine_similarity(Q, r(5, 3)), ValueError, "z"),
    ("negcos unknown reduction", lambda: sslkernels.negative_cosine_similarity(Q, K, reduction="avg"), ValueError,
     "reduction"),
    ("dino center wrong size", lambda: sslkernels.dino_loss(r(8, 6), r(4, 6), r(1, 5)), ValueError, "center"),
    ("dino center [P, 1]", lambda: sslkernels.dino_loss(r(8, 6), r(4, 6), r(6, 1)), ValueError, "center"),
    ("dino dim mismatch", lambda: sslkernels.dino_loss(r(8, 6), r(4, 5), r(1, 6)), ValueError,
     "teacher_output|student_output"),
    ("dino teacher rows not a multiple of crops", lambda: sslkernels.dino_loss(r(8, 6), r(5, 6), r(1, 6)),
     ValueError, "teacher_output|n_global_crops"),
    ("dino student rows not a multiple of batch", lambda: sslkernels.dino_loss(r(7, 6), r(4, 6), r(1, 6)),
     ValueError, "student_output"),
    ("dino student_temp 0", lambda: sslkernels.dino_loss(r(8, 6), r(4, 6), r(1, 6), student_temp=0.0), ValueError,
     "student_temp"),
    ("dino teacher_temp < 0", lambda: sslkernels.dino_loss(r(8, 6), r(4, 6), r(1, 6), teacher_temp=-0.04),
     ValueError, "teacher_temp"),
    ("dino n_global_crops 0", lambda: sslkernels.dino_loss(r(8, 6), r(4, 6), r(1, 6), n_global_crops=0), ValueError,
     "n_global_crops"),
    ("dino unknown reduction", lambda: sslkernels.dino_loss(r(8, 6), r(4, 6), r(1, 6), reduction="avg"), ValueError,
     "reduction"),
    ("update_center_ size mismatch", lambda: sslkernels.update_center_(r(1, 5), r(4, 6)), ValueError, "center"),
    ("update_center_ [2, P/2]", lambda: sslkernels.update_center_(r(2, 3), r(4, 6)), ValueError, "center"),
    ("update_center_ [P, 1]", lambda: sslkernels.update_center_(r(6, 1), r(4, 6)), ValueError, "center"),
    ("update_center_ momentum > 1", lambda: sslkernels.update_center_(r(1, 6), r(4, 6), 1.5), ValueError,
     "momentum"),
    ("sinkhorn 1-d", lambda: sslkernels.sinkhorn_knopp(r(5)), ValueError, "scores"),
    ("sinkhorn empty", lambda: sslkernels.sinkhorn_knopp(r(0, 5)), ValueError, "scores"),
    ("sinkhorn epsilon 0", lambda: sslkernels.sinkhorn_knopp(r(4, 5), epsilon=0.0), ValueError, "epsilon"),
    ("sinkhorn iterations < 0", lambda: sslkernels.sinkhorn_knopp(r(4, 5), iterations=-1), ValueError, "iterations"),
    ("barlow rows differ", lambda: sslkernels.barlow_twins_loss(Q, r(6, 4)), ValueError, "z2|z1"),
    ("barlow dim mismatch", lambda: sslkernels.barlow_twins_loss(Q, r(5, 3)), ValueError, "z2"),
    ("barlow one row", lambda: sslkernels.barlow_twins_loss(r(1, 4), r(1, 4)), ValueError, "z1"),
    ("vicreg rows differ", lambda: sslkernels.vicreg_loss(Q, r(6, 4)), ValueError, "z2|z1"),
    ("vicreg dim mismatch", lambda: sslkernels.vicreg_loss(Q, r(5, 3)), ValueError, "z2"),
    ("vicreg one row", lambda: sslkernels.vicreg_loss(r(1, 4), r(1, 4)), ValueError, "z1"),
    ("vicreg integer", lambda: sslkernels.vicreg_loss(LONG[:, None], LONG[:, None]), TypeError, "z1"),
    ("barlow lambda nan", lambda: sslkernels.barlow_twins_loss(Q, K, float("nan")), ValueError, "lambda_offdiag"),
    ("barlow lambda < 0", lambda: sslkernels.barlow_twins_loss(Q, K, -1e-3), ValueError, "lambda_offdiag"),
    ("barlow lambda None", lambda: sslkernels.barlow_twins_loss(Q, K, None), TypeError, "lambda_offdiag"),
    ("barlow lambda 1-d", lambda: sslkernels.barlow_twins_loss(Q, K, torch.ones(2)), TypeError, "lambda_offdiag"),
    ("barlow lambda requires grad", lambda: sslkernels.barlow_twins_loss(Q, K, torch.tensor(5e-3, requires_grad=True)),
     TypeError, "lambda_offdiag"),
    ("vicreg sim_weight inf", lambda: sslkernels.vicreg_loss(Q, K, float("inf")), ValueError, "sim_weight"),
    ("vicreg var_weight string", lambda: sslkernels.vicreg_loss(Q, K, var_weight="25"), TypeError, "var_weight"),
    ("vicreg cov_weight < 0", lambda: sslkernels.vicreg_loss(Q, K, cov_weight=-1.0), ValueError, "cov_weight"),
    # ---- ema_update_
    ("ema lists of different lengths", lambda: sslkernels.ema_update_([r(3), r(4)], [r(3)], 0.9), ValueError,
     "target|source"),
    ("ema shape mismatch", lambda: sslkernels.ema_update_([r(3), r(4)], [r(3), r(5)], 0.9), ValueError,
     r"target\[1\]|source\[1\]"),
    ("ema integer tensors", lambda: sslkernels.ema_update_([LONG.clone()], [LONG.clone()], 0.9), TypeError,
     "target|source"),
    ("ema momentum > 1", lambda: sslkernels.ema_update_([r(3)], [r(3)], 1.5), ValueError, "momentum"),
    ("ema momentum < 0", lambda: sslkernels.ema_update_([r(3)], [r(3)], -0.1), ValueError, "momentum"),
    ("ema momentum 1-d", lambda: sslkernels.ema_update_([r(3)], [r(3)], torch.full((1,), 0.9)), ValueError,
     "momentum"),
    ("ema single tensor", lambda: sslkernels.ema_update_(r(3), r(3), 0.9), TypeError, "target"),
    ("ema module and list", lambda: sslkernels.ema_update_(nn.Linear(2, 2), [r(2, 2), r(2)], 0.9), TypeError,
     "target|source"),
    ("ema modules of different shapes", lambda: sslkernels.ema_update_(nn.Linear(2, 3), nn.Linear(2, 4), 0.9),
     ValueError, "target|source"),
    ("ema modules of different structure", lambda: sslkernels.ema_update_(nn.Linear(2, 3), nn.Linear(2, 3, bias=False),
                                                                          0.9), ValueError, "target|source"),
    ("ema unknown buffers mode", lambda: sslkernels.ema_update_(nn.Linear(2, 2), nn.Linear(2, 2), 0.9, buffers="avg"),
     ValueError, "buffers"),
    ("ema unknown buffers mode, lists", lambda: sslkernels.ema_update_([r(3)], [r(3)], 0.9, buffers="avg"),
     ValueError, "buffers"),
    # ---- state / similarity
    ("queue dim mismatch", lambda: MemoryQueue(8, 4).enqueue_(r(3, 5)), ValueError, "keys|dim"),
    ("queue keys 1-d", lambda: MemoryQueue(8, 4).enqueue_(r(4)), ValueError, "keys"),
    ("queue integer keys", lambda: MemoryQueue(8, 4).enqueue_(torch.ones(2, 4, dtype=torch.long)), TypeError, "keys"),
    ("queue size 0", lambda: MemoryQueue(0, 4), ValueError, "size"),
    ("queue dim 0", lambda: MemoryQueue(8, 0), ValueError, "dim"),
    ("queue integer dtype", lambda: MemoryQueue(8, 4, dtype=torch.long), TypeError, "dtype"),
    ("momentum encoder momentum > 1", lambda: MomentumEncoder(nn.Linear(2, 2), 1.2), ValueError, "momentum"),
    ("momentum encoder unknown schedule", lambda: MomentumEncoder(nn.Linear(2, 2), schedule="linear"), ValueError,
     "schedule"),
    ("momentum encoder total_steps 0", lambda: MomentumEncoder(nn.Linear(2, 2), total_steps=0), ValueError,
     "total_steps"),
    ("momentum encoder not a module", lambda: MomentumEncoder(r(2, 2)), TypeError, "module"),
    ("momentum encoder step < 0", lambda: MomentumEncoder(nn.Linear(2, 2), total_steps=10).update_(nn.Linear(2, 2), -5),
     ValueError, "step"),
    ("momentum encoder float step", lambda: MomentumEncoder(nn.Linear(2, 2), total_steps=10).update_(nn.Linear(2, 2), 2.5),
     TypeError, "step"),
    ("momentum encoder float step tensor", lambda: MomentumEncoder(nn.Linear(2, 2)).momentum_at(torch.tensor(2.5)),
     TypeError, "step"),
    ("similarity dim mismatch", lambda: sslkernels.similarity(Q, r(5, 3)), ValueError, "b"),
    ("similarity 1-d", lambda: sslkernels.similarity(r(4), K), ValueError, "a"),
    ("knn dim mismatch", lambda: sslkernels.knn_topk(Q, r(30, 3)), ValueError, "bank"),
    ("knn k > bank", lambda: sslkernels.knn_topk(Q, r(10, 4), 11), ValueError, "k"),
    ("knn k 0", lambda: sslkernels.knn_topk(Q, r(10, 4), 0), ValueError, "k"),
    ("rankme 1-d", lambda: sslkernels.rankme(r(5)), ValueError, "embeddings"),
    ("rankme integer", lambda: sslkernels.rankme(torch.ones(4, 3, dtype=torch.long)), TypeError, "embeddings"),
    ("rankme eps < 0", lambda: sslkernels.rankme(r(4, 3), eps=-1.0), ValueError, "eps"),
    ("rankme nan", lambda: sslkernels.rankme(torch.full((5, 3), float("nan"))), ValueError, "embeddings"),
    ("nn.NTXentLoss integer", lambda: sslkernels.nn.NTXentLoss()(LONG[:, None], LONG[:, None]), TypeError, "out0"),
    ("nn.DCLLoss integer", lambda: sslkernels.nn.DCLLoss()(Q, LONG[:, None]), TypeError, "out1"),
]


@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_with_the_argument_named(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


@pytest.mark.parametrize("op", ["info_nce", "nt_xent", "clip_loss", "siglip_loss", "moco_loss", "supcon_loss",
                                "negative_cosine_similarity", "dino_loss", "sinkhorn_knopp", "barlow_twins_loss",
                                "vicreg_loss", "similarity", "knn_topk", "rankme"])
def test_unknown_backend_name(op):
    calls = {
        "info_nce": lambda b: sslkernels.info_nce(Q, K, backend=b),
        "nt_xent": lambda b: sslkernels.nt_xent(Q, K, backend=b),
        "clip_loss": lambda b: sslkernels.clip_loss(Q, K, 10.0, backend=b),
        "siglip_loss": lambda b: sslkernels.siglip_loss(Q, K, 10.0, -10.0, backend=b),
        "moco_loss": lambda b: sslkernels.moco_loss(Q, K, r(9, 4), backend=b),
        "supcon_loss": lambda b: sslkernels.supcon_loss(Q, LONG, backend=b),
        "negative_cosine_similarity": lambda b: sslkernels.negative_cosine_similarity(Q, K, backend=b),
        "dino_loss": lambda b: sslkernels.dino_loss(r(8, 6), r(4, 6), r(1, 6), backend=b),
        "sinkhorn_knopp": lambda b: sslkernels.sinkhorn_knopp(Q, backend=b),
        "barlow_twins_loss": lambda b: sslkernels.barlow_twins_loss(Q, K, backend=b),
        "vicreg_loss": lambda b: sslkernels.vicreg_loss(Q, K, backend=b),
        "similarity": lambda b: sslkernels.similarity(Q, K, backend=b),
        "knn_topk": lambda b: sslkernels.knn_topk(Q, K, 2, backend=b),
        "rankme": lambda b: sslkernels.rankme(Q, backend=b),
    }
    with pytest.raises(ValueError, match="backend"):
        calls[op]("jax")
    with pytest.raises((ValueError, TypeError), match="backend"):
        calls[op](3)


# ------------------------------------------------------------------------- devices


def _two_devices():
    """(device of the features, another device) for a device-mismatch check: CUDA when there is one,
    else the meta device (tensors without storage; a device check must fire before any kernel)."""
    return ("cpu", "cuda") if HAS_CUDA else ("cpu", "meta")


DEVICE_CASES = [
    ("info_nce key", lambda o: sslkernels.info_nce(Q, K.to(o)), "key"),
    ("info_nce temperature", lambda o: sslkernels.info_nce(Q, K, torch.tensor(0.1, device=o)), "temperature"),
    ("info_nce per-anchor temperature", lambda o: sslkernels.info_nce(Q, K, torch.full((5,), 0.1, device=o)),
     "temperature"),
    ("info_nce targets", lambda o: sslkernels.info_nce(Q, K, targets=LONG.to(o)), "targets"),
    ("nt_xent z2", lambda o: sslkernels.nt_xent(Q, K.to(o)), "z2"),
    ("clip text_features", lambda o: sslkernels.clip_loss(Q, K.to(o), 10.0), "text_features"),
    ("clip logit_scale", lambda o: sslkernels.clip_loss(Q, K, torch.tensor(10.0, device=o)), "logit_scale"),
    ("siglip logit_bias", lambda o: sslkernels.siglip_loss(Q, K, 10.0, torch.tensor(-10.0, device=o)), "logit_bias"),
    ("moco queue", lambda o: sslkernels.moco_loss(Q, K, r(9, 4).to(o)), "queue"),
    ("supcon labels", lambda o: sslkernels.supcon_loss(Q, LONG.to(o)), "labels"),
    ("dino center", lambda o: sslkernels.dino_loss(r(8, 6), r(4, 6), r(1, 6).to(o)), "center"),
    ("ema source", lambda o: sslkernels.ema_update_([r(3)], [r(3).to(o)], 0.9), "source|target"),
    ("similarity b", lambda o: sslkernels.similarity(Q, K.to(o)), "b"),
    ("queue keys", lambda o: MemoryQueue(8, 4).enqueue_(r(3, 4).to(o)), "keys|queue"),
]


@pytest.mark.parametrize("call,pattern", [c[1:] for c in DEVICE_CASES], ids=[c[0] for c in DEVICE_CASES])
def test_tensors_on_different_devices(call, pattern):
    _, other = _two_devices()
    with pytest.raises(ValueError, match=pattern):
        call(other)
