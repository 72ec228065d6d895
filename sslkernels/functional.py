"""Public functional API (docs/API.md): validate arguments once, pick a backend, call the op.

Every function takes ``backend=None`` ("auto" unless set_backend / SSLKERNELS_BACKEND say otherwise).
"""
from __future__ import annotations

import functools
import operator
import sys
from typing import Optional, Union

import torch
from torch import nn

from . import _checks as check
from . import _module_pairs as _module_pairs_walk
from . import distributed as _dist
from .backends import dispatch
from .ops import contrastive_dist as _contrastive_dist
from .reference import compute_dtype

Scalar = Union[float, torch.Tensor]

__all__ = [
    "info_nce", "nt_xent", "clip_loss", "siglip_loss", "moco_loss", "supcon_loss",
    "negative_cosine_similarity", "dino_loss", "update_center_", "sinkhorn_knopp", "swav_loss",
    "barlow_twins_loss", "vicreg_loss", "ema_update_", "similarity", "knn_topk", "rankme",
]


def _outside_autocast(loss_fn):
    """Run a loss as autocast runs F.cross_entropy: in its inputs' precision, not autocast's.

    Inside ``torch.autocast`` the matmuls of the CPU and reference paths would otherwise drop to bf16 /
    fp16 (fp32 features then lose ~3 digits in the logits, and an LSE over thousands of them more). The
    kernels already take bf16 / fp16 features as they are and accumulate in fp32; fp32 features stay fp32.
    """
    @functools.wraps(loss_fn)
    def wrapper(*args, **kwargs):
        if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
            with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
                return loss_fn(*args, **kwargs)
        return loss_fn(*args, **kwargs)
    return wrapper


def _across_ranks(gather_distributed, distributed, process_group) -> Optional[str]:
    """None when the loss stays on this rank (nothing asked, or one rank), else "ring" or "gather"
    (ops/contrastive_dist.py)."""
    if not _dist.requested(gather_distributed, distributed, process_group):
        return None
    return "ring" if distributed == "ring" else "gather"


def _compiled_loss(name: str, backend, *args) -> torch.Tensor:
    """The loss through its torch.library custom ops (library.py): what runs while torch.compile traces.

    Dynamo cannot trace the implementations, but it can trace the validation before this call, so a
    compiled step keeps every check and takes the loss as one graph node (fullgraph=True holds). Imported
    here so that `import sslkernels` registers no ops for programs that never compile.
    """
    from . import library
    return library.loss(name, backend, *args)


def _pair(a_name, a, b_name, b, *, same_rows: bool) -> None:
    check.features(a, a_name)
    check.features(b, b_name)
    check.same_device((a_name, a), (b_name, b))
    check.same_dtype((a_name, a), (b_name, b))
    check.same_dim(a_name, a, b_name, b)
    if same_rows and a.shape[0] != b.shape[0]:
        raise ValueError(f"{b_name} has {b.shape[0]} rows but {a_name} has {a.shape[0]}; they must pair up row by row")


# --------------------------------------------------------------------------------------- contrastive


@_outside_autocast
def info_nce(query, key, temperature: Scalar = 0.1, *, targets=None, symmetric: bool = False, decoupled: bool = False,
             reduction: str = "mean", gather_distributed: bool = False, distributed: Optional[str] = None,
             process_group=None, backend: Optional[str] = None) -> torch.Tensor:
    """InfoNCE over logits = query @ key.T / τ (N×M, never materialized on the fused paths); docs/API.md.

    Row i's loss is LSE_j(logits[i, j]) − logits[i, t_i] with t_i = ``targets[i]`` (a LongTensor [N]), or i
    when ``targets`` is None (then N must equal M). ``decoupled=True`` (DCL) leaves the positive out of the
    LSE; ``symmetric=True`` (CLIP-style, N == M, no targets) averages the row and the column losses.
    ``temperature``: a float, a 0-d tensor (learnable: it gets a gradient) or a [N] tensor (per-anchor τ_i).
    Inputs are used as given (not L2-normalized): pass normalized features where the method does.

    ``gather_distributed=True`` on several ranks (of ``process_group``): this rank's queries against every
    rank's keys (and, with ``symmetric``, its keys against every rank's queries); ``targets`` index the
    gathered keys, and without them local row i's positive is this rank's key i. The reduction runs over
    the local rows (README "Distributed"). ``distributed="ring"``: the same loss with the keys (and their
    gradients) passed around the ring instead of gathered, so memory per rank does not grow with the ranks."""
    _pair("query", query, "key", key, same_rows=False)
    n, m = query.shape[0], key.shape[0]
    temperature = check.positive_scalar(temperature, "temperature", query.device, per_row=n)
    check.reduction(reduction)
    if symmetric:
        if targets is not None:
            raise ValueError("targets must be None when symmetric=True (the positive of row i is column i)")
        if n != m:
            raise ValueError(f"symmetric=True needs as many keys as queries; query has {n} rows, key has {m}")
    if targets is None:
        if n != m:
            raise ValueError(f"targets is None, so key must have as many rows as query ({n}), got {m}; "
                             "pass targets to pick each query's positive")
    across = _across_ranks(gather_distributed, distributed, process_group)
    if targets is not None:  # across ranks they index the gathered keys: checked against their global count
        targets = check.index_vector(targets, "targets", n, query.device, upper=None if across else m)
    if decoupled and m < 2 and not across:
        raise ValueError("decoupled=True needs at least 2 keys: with the positive left out, 1 key leaves no negative")
    if across:
        return _contrastive_dist.info_nce(query, key, temperature, targets, bool(symmetric), bool(decoupled),
                                          reduction, process_group, backend, across == "ring")
    if torch.compiler.is_compiling():
        return _compiled_loss("info_nce", backend, query, key, temperature, targets, bool(symmetric), bool(decoupled),
                              reduction)
    impl = dispatch("info_nce", backend, query.device)
    return impl(query, key, temperature, targets, bool(symmetric), bool(decoupled), reduction)


@_outside_autocast
def nt_xent(z1, z2, temperature: Scalar = 0.5, *, decoupled: bool = False, reduction: str = "mean",
            gather_distributed: bool = False, distributed: Optional[str] = None, process_group=None,
            backend: Optional[str] = None) -> torch.Tensor:
    """SimCLR's NT-Xent over Z = cat([z1, z2]); the positive of row i is row (i + N) mod 2N.

    Inputs are used as given (not L2-normalized, unlike lightly's NTXentLoss module, which normalizes):
    SimCLR passes normalized projections. ``gather_distributed=True``: this rank's 2n rows against all ranks' 2N (own row left out); the
    reduction runs over the local 2n rows."""
    _pair("z1", z1, "z2", z2, same_rows=True)
    temperature = check.positive_scalar(temperature, "temperature", z1.device)
    check.reduction(reduction)
    across = _across_ranks(gather_distributed, distributed, process_group)
    if decoupled and z1.shape[0] < 2 and not across:  # across ranks the other ranks' pairs are negatives
        raise ValueError("decoupled=True needs a batch of at least 2 pairs: with 1 pair there is no negative")
    if across:
        return _contrastive_dist.nt_xent(z1, z2, temperature, bool(decoupled), reduction, process_group, backend,
                                         across == "ring")
    if torch.compiler.is_compiling():
        return _compiled_loss("nt_xent", backend, z1, z2, temperature, bool(decoupled), reduction)
    impl = dispatch("nt_xent", backend, z1.device)
    return impl(z1, z2, temperature, bool(decoupled), reduction)


@_outside_autocast
def clip_loss(image_features, text_features, logit_scale: Scalar, *, reduction: str = "mean",
              gather_distributed: bool = False, distributed: Optional[str] = None, process_group=None,
              backend: Optional[str] = None) -> torch.Tensor:
    """CLIP's symmetric loss; ``logit_scale`` is already exponentiated (OpenCLIP passes logit_scale.exp()):
    the raw parameter (log(1/0.07) ≈ 2.66 at CLIP's init) would train at τ ≈ 0.38 without any error.
    Features are used as given: CLIP passes L2-normalized ones.

    ``gather_distributed=True``: OpenCLIP's ``local_loss=True, gather_with_grad=True`` (each rank's images
    and texts against every rank's texts and images, mean over the local pairs)."""
    _pair("image_features", image_features, "text_features", text_features, same_rows=True)
    logit_scale = check.positive_scalar(logit_scale, "logit_scale", image_features.device)
    check.reduction(reduction)
    across = _across_ranks(gather_distributed, distributed, process_group)
    if across:
        return _contrastive_dist.clip_loss(image_features, text_features, logit_scale, reduction, process_group,
                                           backend, across == "ring")
    if torch.compiler.is_compiling():
        return _compiled_loss("clip_loss", backend, image_features, text_features, logit_scale, reduction)
    impl = dispatch("clip_loss", backend, image_features.device)
    return impl(image_features, text_features, logit_scale, reduction)


@_outside_autocast
def siglip_loss(image_features, text_features, logit_scale: Scalar, logit_bias: Scalar, *, reduction: str = "mean",
                gather_distributed: bool = False, distributed: Optional[str] = None, process_group=None,
                backend: Optional[str] = None) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (OpenCLIP's SigLipLoss on one device).

    Across ranks (``gather_distributed=True`` or ``distributed="ring"``): this rank's images against every
    rank's texts, the other ranks' all negatives, summed over pairs and divided by the local rows (OpenCLIP's
    SigLipLoss with world_size > 1)."""
    _pair("image_features", image_features, "text_features", text_features, same_rows=True)
    logit_scale = check.positive_scalar(logit_scale, "logit_scale", image_features.device)
    logit_bias = check.finite_scalar(logit_bias, "logit_bias", image_features.device)
    check.reduction(reduction)
    across = _across_ranks(gather_distributed, distributed, process_group)
    if across:
        return _contrastive_dist.siglip_loss(image_features, text_features, logit_scale, logit_bias, reduction,
                                             process_group, backend, across == "ring")
    if torch.compiler.is_compiling():
        return _compiled_loss("siglip_loss", backend, image_features, text_features, logit_scale, logit_bias,
                              reduction)
    impl = dispatch("siglip_loss", backend, image_features.device)
    return impl(image_features, text_features, logit_scale, logit_bias, reduction)


@_outside_autocast
def moco_loss(query, key, queue, temperature: Scalar = 0.2, *, reduction: str = "mean",
              gather_distributed: bool = False, distributed: Optional[str] = None, process_group=None,
              backend: Optional[str] = None) -> torch.Tensor:
    """MoCo v1/v2: positive q·k at index 0, the K rows of ``queue`` (a tensor or MemoryQueue) as negatives.

    ``queue`` is K×D, rows are negatives (solo-learn's D×K queue needs ``.T``: with K == D it would pass
    unnoticed). Inputs are used as given: MoCo passes L2-normalized q and k.

    ``gather_distributed=True`` leaves the loss per rank (the queue already holds every rank's keys)."""
    if isinstance(queue, nn.Module) and hasattr(queue, "queue"):
        queue = queue.queue
    _pair("query", query, "key", key, same_rows=True)
    check.features(queue, "queue")
    check.same_device(("query", query), ("queue", queue))
    check.same_dim("query", query, "queue", queue)
    if queue.dtype != query.dtype:  # e.g. an fp32 queue with bf16 features under autocast
        queue = queue.to(query.dtype)
    temperature = check.positive_scalar(temperature, "temperature", query.device)
    check.reduction(reduction)
    # Across ranks MoCo's loss stays per rank: the positive is the rank's own key and the negatives are the
    # queue, which already holds every rank's keys (MemoryQueue.enqueue_ gathers them).
    _across_ranks(gather_distributed, distributed, process_group)
    if torch.compiler.is_compiling():
        return _compiled_loss("moco_loss", backend, query, key, queue, temperature, reduction)
    impl = dispatch("moco_loss", backend, query.device)
    return impl(query, key, queue, temperature, reduction)


@_outside_autocast
def supcon_loss(features, labels, temperature: Scalar = 0.1, *, reduction: str = "mean",
                gather_distributed: bool = False, distributed: Optional[str] = None, process_group=None,
                backend: Optional[str] = None) -> torch.Tensor:
    """Supervised contrastive loss (L_out); anchors without a positive give 0 and leave the mean.

    ``gather_distributed=True``: this rank's anchors against every rank's features and labels; the mean
    is over the local anchors that have a positive on some rank."""
    check.features(features, "features")
    labels = check.index_vector(labels, "labels", features.shape[0], features.device)
    temperature = check.positive_scalar(temperature, "temperature", features.device)
    check.reduction(reduction)
    across = _across_ranks(gather_distributed, distributed, process_group)
    if across:
        return _contrastive_dist.supcon_loss(features, labels, temperature, reduction, process_group, backend,
                                             across == "ring")
    if torch.compiler.is_compiling():
        return _compiled_loss("supcon_loss", backend, features, labels, temperature, reduction)
    impl = dispatch("supcon_loss", backend, features.device)
    return impl(features, labels, temperature, reduction)


# --------------------------------------------------------------------------------- non-contrastive


@_outside_autocast
def negative_cosine_similarity(p, z, *, reduction: str = "mean", stop_gradient: bool = True, eps: float = 1e-8,
                               backend: Optional[str] = None) -> torch.Tensor:
    """BYOL / SimSiam: −cos(p_i, z_i) with a stop-gradient on ``z``.

    ``stop_gradient=False`` lets ``z`` have its gradient too (lightly's NegativeCosineSimilarity).
    ``eps``: the norms are clamped to at least ``eps`` (F.cosine_similarity's convention)."""
    _pair("p", p, "z", z, same_rows=True)
    check.reduction(reduction)
    eps = check.positive_scalar(eps, "eps", p.device)
    if isinstance(eps, torch.Tensor):
        raise TypeError("eps must be a float")
    return dispatch("negative_cosine_similarity", backend, p.device)(p, z, reduction, bool(stop_gradient), eps)


@_outside_autocast
def dino_loss(student_output, teacher_output, center, *, student_temp: float = 0.1, teacher_temp: Scalar = 0.04,
              n_global_crops: int = 2, reduction: str = "mean", backend: Optional[str] = None) -> torch.Tensor:
    """DINO's cross-entropy between centred, sharpened teacher crops and every other student crop."""
    check.features(student_output, "student_output")
    check.features(teacher_output, "teacher_output")
    check.tensor(center, "center")
    check.same_device(("student_output", student_output), ("teacher_output", teacher_output), ("center", center))
    check.same_dim("student_output", student_output, "teacher_output", teacher_output)
    p = student_output.shape[1]
    if center.numel() != p or center.dim() not in (1, 2) or center.shape[-1] != p:
        raise ValueError(f"center must have shape [1, {p}] (or [{p}]), got {tuple(center.shape)}")
    if isinstance(n_global_crops, bool) or not isinstance(n_global_crops, int) or n_global_crops < 1:
        raise ValueError(f"n_global_crops must be a positive int, got {n_global_crops!r}")
    t_rows, s_rows = teacher_output.shape[0], student_output.shape[0]
    if t_rows % n_global_crops:
        raise ValueError(f"teacher_output has {t_rows} rows, not a multiple of n_global_crops={n_global_crops}")
    b = t_rows // n_global_crops
    if s_rows % b:
        raise ValueError(f"student_output has {s_rows} rows, not a multiple of the batch size {b} "
                         f"(= teacher rows {t_rows} / n_global_crops {n_global_crops}); dino_loss takes the student "
                         "first, then the teacher (lightly's DINOLoss.forward takes the teacher first)")
    if s_rows // b == 1 and n_global_crops == 1:
        raise ValueError("dino_loss needs at least one (teacher crop, student crop) pair with different crops; "
                         f"got {s_rows // b} student crop(s) and {n_global_crops} teacher crop(s)")
    student_temp = check.positive_scalar(student_temp, "student_temp", student_output.device)
    if isinstance(student_temp, torch.Tensor):
        raise TypeError("student_temp must be a float")
    teacher_temp = check.positive_scalar(teacher_temp, "teacher_temp", student_output.device)
    check.reduction(reduction)
    if torch.compiler.is_compiling():
        return _compiled_loss("dino_loss", backend, student_output, teacher_output, center, student_temp, teacher_temp,
                              n_global_crops, reduction)
    impl = dispatch("dino_loss", backend, student_output.device)
    return impl(student_output, teacher_output, center, student_temp, teacher_temp, n_global_crops, reduction)


def update_center_(center, teacher_output, momentum: Scalar = 0.9, *, async_op: bool = False, process_group=None,
                   backend: Optional[str] = None):
    """In place: center ← m·center + (1−m)·mean over rows of teacher_output (over all ranks when distributed).

    Returns ``center``. With ``async_op=True`` (DINOv2's asynchronous centring) the column sums are taken
    now and their all-reduce is started without waiting; the centre is left unchanged and a handle comes
    back whose ``wait()`` finishes the all-reduce and applies the EMA (once; ``is_completed()`` polls).
    Call it before the centre is next used, e.g. just before the next ``dino_loss``.
    """
    check.tensor(center, "center")
    check.features(teacher_output, "teacher_output")
    check.same_device(("center", center), ("teacher_output", teacher_output))
    if not center.is_floating_point():
        raise TypeError(f"center must be a floating-point tensor, got {center.dtype}")
    if center.numel() != teacher_output.shape[1] or center.shape[-1] != teacher_output.shape[1]:
        # Any leading ones ([P], [1, P], lightly's [1, 1, P]); a [2, P/2] center would be updated as if flattened.
        raise ValueError(f"center must have shape [1, {teacher_output.shape[1]}] (one value per column of "
                         f"teacher_output), got {tuple(center.shape)}")
    momentum = check.momentum(momentum, device=center.device)
    if torch.compiler.is_compiling() and not async_op and not _dist.is_distributed(process_group):
        from . import library  # as in _compiled_loss; the asynchronous / all-reduce forms stay eager (graph break)
        library.update_center_(center, teacher_output, momentum, backend)
        return center
    return dispatch("update_center_", backend, center.device)(center, teacher_output, momentum, bool(async_op),
                                                              process_group)


def _sinkhorn_args(epsilon, iterations, device):
    epsilon = check.positive_scalar(epsilon, "epsilon", device)
    if isinstance(epsilon, torch.Tensor):
        raise TypeError("epsilon must be a float")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative int, got {iterations!r}")
    return epsilon


def sinkhorn_knopp(scores, *, epsilon: float = 0.05, iterations: int = 3, gather_distributed: bool = False,
                   process_group=None, backend: Optional[str] = None) -> torch.Tensor:
    """SwAV / DINOv2 equipartition assignments (B×P, rows sum to 1), stable for any score range.

    ``gather_distributed=True``: each rank holds its own samples of one batch (SwAV's distributed_sinkhorn,
    lightly's ``sinkhorn_gather_distributed``): the per-prototype sums and B span all ranks of
    ``process_group``; no scores are gathered, only P-vectors are all-reduced."""
    check.features(scores, "scores")
    epsilon = _sinkhorn_args(epsilon, iterations, scores.device)
    return dispatch("sinkhorn_knopp", backend, scores.device)(scores, epsilon, iterations, bool(gather_distributed),
                                                              process_group)


def _crop_list(crops, name: str, *, allow_empty: bool = False):
    if isinstance(crops, torch.Tensor) or not isinstance(crops, (list, tuple)):
        raise TypeError(f"{name} must be a list of 2-d tensors (one per crop), got {type(crops).__name__}")
    if not crops and not allow_empty:
        raise ValueError(f"{name} must hold at least one crop")
    for i, z in enumerate(crops):
        check.features(z, f"{name}[{i}]")
    return list(crops)


@_outside_autocast
def swav_loss(high_resolution_outputs, low_resolution_outputs=(), *, temperature: float = 0.1, epsilon: float = 0.05,
              iterations: int = 3, queue_outputs=None, gather_distributed: bool = False, process_group=None,
              backend: Optional[str] = None) -> torch.Tensor:
    """SwaV (Caron et al. 2020) as lightly's SwaVLoss: each high-resolution crop's prototype scores give codes
    q = sinkhorn_knopp(scores [+ that crop's ``queue_outputs`` rows], epsilon, iterations); every other crop
    predicts them with −Σ_p q·log_softmax(scores/temperature), averaged over the batch and the crop pairs.
    Codes get no gradient. On the fused paths the codes are never formed: with iterations ≥ 1 they are
    DINO's teacher probabilities, and the loss runs on dino_loss's kernels."""
    high = _crop_list(high_resolution_outputs, "high_resolution_outputs")
    low = _crop_list(low_resolution_outputs, "low_resolution_outputs", allow_empty=True)
    first = high[0]
    for name, crops in (("high_resolution_outputs", high), ("low_resolution_outputs", low)):
        for i, z in enumerate(crops):
            check.same_device(("high_resolution_outputs[0]", first), (f"{name}[{i}]", z))
            if z.shape != first.shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(z.shape)} but high_resolution_outputs[0] has "
                                 f"{tuple(first.shape)}; every crop must score the same batch on the same prototypes")
    if len(high) + len(low) < 2:
        raise ValueError("swav_loss needs at least two crops: each crop's codes are predicted by the other crops")
    if queue_outputs is not None:
        queue_outputs = _crop_list(queue_outputs, "queue_outputs")
        if len(queue_outputs) < len(high):
            raise ValueError(f"queue_outputs has {len(queue_outputs)} entries; one per high-resolution crop "
                             f"({len(high)}) is needed")
        for i, q in enumerate(queue_outputs[:len(high)]):
            check.same_device(("high_resolution_outputs[0]", first), (f"queue_outputs[{i}]", q))
            check.same_dim("high_resolution_outputs[0]", first, f"queue_outputs[{i}]", q)
    temperature = check.positive_scalar(temperature, "temperature", first.device)
    if isinstance(temperature, torch.Tensor):
        raise TypeError("temperature must be a float")
    epsilon = _sinkhorn_args(epsilon, iterations, first.device)
    impl = dispatch("swav_loss", backend, first.device)
    return impl(high, low, temperature, epsilon, iterations, queue_outputs, bool(gather_distributed), process_group)


@_outside_autocast
def barlow_twins_loss(z1, z2, lambda_offdiag: float = 5e-3, *, backend: Optional[str] = None) -> torch.Tensor:
    """Barlow Twins: batch-normalized cross-correlation pushed to the identity."""
    _pair("z1", z1, "z2", z2, same_rows=True)
    if z1.shape[0] < 2:
        raise ValueError("z1 needs at least 2 rows: Barlow Twins normalizes each feature over the batch")
    lambda_offdiag = check.loss_weight(lambda_offdiag, "lambda_offdiag")
    if torch.compiler.is_compiling():
        return _compiled_loss("barlow_twins_loss", backend, z1, z2, lambda_offdiag)
    return dispatch("barlow_twins_loss", backend, z1.device)(z1, z2, lambda_offdiag)


@_outside_autocast
def vicreg_loss(z1, z2, sim_weight: float = 25.0, var_weight: float = 25.0, cov_weight: float = 1.0, *,
                backend: Optional[str] = None) -> torch.Tensor:
    """VICReg: invariance (MSE) + variance hinge + covariance off-diagonal penalty."""
    _pair("z1", z1, "z2", z2, same_rows=True)
    if z1.shape[0] < 2:
        raise ValueError("z1 needs at least 2 rows: VICReg's variance and covariance terms are over the batch")
    weights = [check.loss_weight(w, name) for w, name in
               ((sim_weight, "sim_weight"), (var_weight, "var_weight"), (cov_weight, "cov_weight"))]
    if torch.compiler.is_compiling():
        return _compiled_loss("vicreg_loss", backend, z1, z2, *weights)
    return dispatch("vicreg_loss", backend, z1.device)(z1, z2, *weights)


# -------------------------------------------------------------------------------------- state ops

BUFFER_MODES = ("copy", "ema", "skip")


def _module_pairs(target: nn.Module, source: nn.Module, buffers: str):
    """(ema targets, ema sources, copy targets, copy sources, ema names, copy names) for two modules of one
    architecture."""
    params, (b_names, b_t, b_s) = _module_pairs_walk.named_pairs(target, source)
    ema_names, ema_t, ema_s = (list(x) for x in params)  # copies: the names are the kept walk's
    copy_t, copy_s, copy_names = [], [], []
    for k, t, s in zip(b_names, b_t, b_s):
        # Read per call, not cached with the walk: a buffer's dtype can change under the same tensor object.
        if t.is_floating_point() and buffers == "ema":
            ema_t.append(t)
            ema_s.append(s)
            ema_names.append(k)
        elif not t.is_floating_point() or buffers == "copy":
            copy_t.append(t)  # integer buffers (e.g. num_batches_tracked) are always copied
            copy_s.append(s)
            copy_names.append(k)
    return ema_t, ema_s, copy_t, copy_s, ema_names, copy_names


def _copy_buffers_(targets: list, sources: list) -> None:
    """t.copy_(s) for every pair, as one foreach copy per (device, dtype) group (a few launches on a GPU
    instead of one per buffer: ResNet-50 has 159 buffers)."""
    groups: dict = {}
    for t, s in zip(targets, sources):
        key = (t.device, t.dtype, s.device, s.dtype)
        entry = groups.setdefault(key, ([], []))
        entry[0].append(t)
        entry[1].append(s)
    for ts, ss in groups.values():
        torch._foreach_copy_(ts, ss)


def _dtensor_type():
    """DTensor's class if torch.distributed.tensor was imported (no DTensor can exist otherwise), else None."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def _local_pairs(targets: list, sources: list, what: str):
    """The local tensors of DTensor pairs (FSDP2-sharded parameters, tensor-parallel weights).

    The EMA is elementwise, so each rank updating its own shard is the whole update: no communication.
    Two DTensors must share mesh and placements (then their shards cover the same elements); a DTensor
    paired with a plain tensor takes that tensor as its local shard (the shapes must then match the shard).
    FSDP1's flat parameters are plain tensors already and pass through unchanged.
    """
    dtensor = _dtensor_type()
    if dtensor is None:
        return targets, sources
    out_t, out_s = [], []
    for i, (t, s) in enumerate(zip(targets, sources)):
        t_d, s_d = isinstance(t, dtensor), isinstance(s, dtensor)
        if t_d and s_d and (t.device_mesh != s.device_mesh or tuple(t.placements) != tuple(s.placements)):
            raise ValueError(f"{what}: target[{i}] and source[{i}] are DTensors with different meshes or placements "
                             f"({tuple(t.placements)} vs {tuple(s.placements)}); their local shards do not pair up")
        out_t.append(t._local_tensor if t_d else t)
        out_s.append(s._local_tensor if s_d else s)
    return out_t, out_s


def _local_momentum(momentum):
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(momentum, dtensor):
        return momentum.full_tensor()  # a 0-d DTensor: replicate (a no-op for Replicate placements)
    return momentum


@torch.no_grad()
def ema_update_(target, source, momentum: Scalar, *, buffers: str = "copy", backend: Optional[str] = None) -> None:
    """In place, for every pair: t ← m·t + (1 − m)·s. ``target``/``source``: tensor iterables or nn.Modules.

    DTensors (FSDP2 / tensor-parallel parameters) are updated through their local shards, on every rank.
    Computed in fp32 and rounded once into the target: a bf16 / fp16 target loses every update smaller than
    half its ulp (in bf16, (1 − m)·|s − t| < 2⁻⁹·|t|), so a bf16 teacher at m = 0.996 nearly stops moving.
    Keep EMA copies in fp32 (``sslkernels.nn.ModelEmaV3`` rounds a bf16 copy stochastically, as timm's).
    A target may not share memory with another target or with another pair's source (ValueError).
    """
    if buffers not in BUFFER_MODES:  # checked for tensor lists too, where it has no effect: a typo is still one
        raise ValueError(f"buffers must be one of {BUFFER_MODES}, got {buffers!r}")
    # Everything is validated before anything is written: a rejected call leaves the target as it was.
    names = copy_t = None
    if isinstance(target, nn.Module) or isinstance(source, nn.Module):
        if not (isinstance(target, nn.Module) and isinstance(source, nn.Module)):
            raise TypeError("target and source must both be nn.Modules or both be iterables of tensors")
        targets, sources, copy_t, copy_s, names, copy_names = _module_pairs(target, source, buffers)
        copy_t, copy_s = _local_pairs(copy_t, copy_s, "ema_update_ buffers")
        for k, t, s in zip(copy_names, copy_t, copy_s):
            if t.shape != s.shape:
                raise ValueError(f"buffer {k!r} has shape {tuple(t.shape)} in the target but {tuple(s.shape)} "
                                 "in the source")
    else:
        targets, sources = check.tensor_list(target, "target"), check.tensor_list(source, "source")
    if len(targets) == len(sources):  # a length mismatch is reported by ema_pairs
        targets, sources = _local_pairs(targets, sources, "ema_update_")
    if len(targets) != len(sources):
        check.ema_pairs(targets, sources)  # raises the length message
    device = targets[0].device if targets else None
    momentum = check.momentum(_local_momentum(momentum), device=device)
    compiling = torch.compiler.is_compiling()
    if compiling:
        # Dynamo cannot read addresses (the signature's cache key, the overlap check); traced checks cost
        # nothing per step anyway.
        check.ema_lists(targets, sources, names)
    else:
        signature = check.tensors_signature(targets, sources)
        check.ema_pairs_cached(targets, sources, signature, names)
    if copy_t:
        _copy_buffers_(copy_t, copy_s)
    if not targets:
        return
    if isinstance(momentum, torch.Tensor) and momentum.device != device:
        momentum = momentum.to(device)  # a host tensor only while compiling (check.momentum reads it otherwise)
    if compiling:
        from . import library  # as in _compiled_loss
        library.ema_update_(targets, sources, momentum, backend)
        return
    # The tensors go as they are (no .data aliases: 300 new tensor objects per call cost more host time than
    # a ViT-B update's kernel); in-place writes to leaves that require grad are allowed under no_grad.
    impl = dispatch("ema_update_", backend, device)
    with check.remember_signature(targets, sources, signature):
        impl(targets, sources, momentum)


# ----------------------------------------------------------------------------- similarity and eval


@_outside_autocast  # as the losses: fp32 features keep fp32 similarities (and the same neighbours) under autocast
def similarity(a, b, *, normalize: bool = True, backend: Optional[str] = None) -> torch.Tensor:
    """Cosine (``normalize=True``) or dot-product similarity matrix a @ b.T."""
    _pair("a", a, "b", b, same_rows=False)
    return dispatch("similarity", backend, a.device)(a, b, bool(normalize))


@_outside_autocast
def knn_topk(query, bank, k: int = 20, *, normalize: bool = True, backend: Optional[str] = None):
    """(values, indices) of the ``k`` most similar rows of ``bank`` per query, without the N×M matrix.

    The search itself is not differentiable (indices), the values are: when ``query`` or ``bank`` requires
    grad, they are recomputed from the indices with autograd (O(N·k·D), as NNCLR-style losses need).
    """
    _pair("query", query, "bank", bank, same_rows=False)
    if isinstance(k, bool):
        raise TypeError("k must be an int, got bool")
    try:
        k = operator.index(k)  # ints, numpy integers, 0-d integer tensors
    except TypeError:
        raise TypeError(f"k must be an int, got {type(k).__name__}") from None
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k must be in [1, {bank.shape[0]}] (the bank's rows), got {k}")
    values, indices = dispatch("knn_topk", backend, query.device)(query, bank, k, bool(normalize))
    if torch.is_grad_enabled() and (query.requires_grad or bank.requires_grad):
        values = _knn_values(query, bank, indices, bool(normalize)).to(values.dtype)
    return values, indices


def _knn_values(query, bank, indices, normalize: bool) -> torch.Tensor:
    """sim(query_i, bank_{indices_ij}) with autograd, in the compute dtype (F.normalize's convention)."""
    dtype = compute_dtype(query.dtype)
    q, b = query.to(dtype), bank.to(dtype)
    if normalize:
        q, b = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(b, dim=1)
    return torch.bmm(b[indices], q[:, :, None])[:, :, 0]


def rankme(embeddings, eps: float = 1e-7, *, backend: Optional[str] = None) -> float:
    """RankMe (Garrido et al. 2023): exp of the entropy of the normalized singular values.

    One implementation (an SVD, on any device): a process-wide default backend does not apply to it.
    """
    check.features(embeddings, "embeddings")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    if not bool(torch.isfinite(embeddings).all()):  # rankme returns a float: the host read is paid anyway
        raise ValueError("embeddings contain NaN or infinite values; RankMe's singular values are undefined")
    return dispatch("rankme", "auto" if backend is None else backend, embeddings.device)(embeddings, float(eps))
