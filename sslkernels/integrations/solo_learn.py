"""solo-learn's loss functions (solo-learn 1.0.2, the release on PyPI) on sslkernels' fused ops.

Same names, signatures, defaults and numbers as ``solo.losses`` of that release:

  simclr_loss_func(z1, z2, temperature=0.1, extra_pos_mask=None)
  moco_loss_func(query, key, queue, temperature=0.1)         queue is D×K (columns are negatives), as solo's
  byol_loss_func(p, z, simplified=True)
  simsiam_loss_func(p, z, simplified=True)
  barlow_loss_func(z1, z2, lamb=5e-3, scale_loss=0.025)
  vicreg_loss_func(z1, z2, sim_loss_weight=25.0, var_loss_weight=25.0, cov_loss_weight=1.0)

Each also takes a keyword-only ``backend``. Inputs are [N, D] feature matrices (solo's functions also
accept more leading dims in places; its methods never pass them). Later solo-learn versions (GitHub main,
not on PyPI) renamed and changed some of these; on one process these forms are here too:

  simclr_loss_func(z, indexes, temperature=0.1)              positives: rows with equal (integer) indexes
  mocov2plus_loss_func(query, key, queue, temperature=0.1)   = moco_loss_func
  mocov3_loss_func(query, key, temperature=0.2)              InfoNCE of the normalized features × 2τ

They are tested against float64 formulas (tests/test_solo_learn_main_forms.py), not against solo's code, which
no installable release has.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _checks as check
from .. import functional as Fn
from ..distributed import is_distributed
from ..ops.cross_correlation_dist import barlow_twins_across_ranks

__all__ = ["simclr_loss_func", "moco_loss_func", "mocov2plus_loss_func", "mocov3_loss_func", "byol_loss_func",
           "simsiam_loss_func", "barlow_loss_func", "vicreg_loss_func"]


def simclr_loss_func(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1,
                     extra_pos_mask: Optional[torch.Tensor] = None, *, backend: Optional[str] = None) -> torch.Tensor:
    """SimCLR's loss over Z = normalize(cat(z1, z2)) (2N rows; solo normalizes inside).

    Also solo-learn main's form ``simclr_loss_func(z, indexes, temperature=0.1)`` (an integer ``indexes``
    as the second argument): see :func:`_simclr_by_index`.

    Without ``extra_pos_mask`` the positive of row i is its other view: NT-Xent (``nt_xent``). With it
    (a 2N×2N bool mask, solo's supervised SimCLR), a row's loss averages −log p over all its positives
    (mask OR other view). When those positives are "same label" sets (what solo's gen_extra_positives_gt
    builds), this is SupCon's L_out and runs on ``supcon_loss`` with the labels read off the mask; any
    other mask takes an eager path with solo's formula (it is N×N anyway).
    """
    if isinstance(z2, torch.Tensor) and not (z2.is_floating_point() or z2.is_complex()):
        if extra_pos_mask is not None:
            raise TypeError("extra_pos_mask belongs to the (z1, z2) form; the (z, indexes) form takes positives "
                            "from indexes")
        return _simclr_by_index(z1, z2, temperature, backend)
    check.features(z1, "z1")
    check.features(z2, "z2")
    if z1.shape != z2.shape:
        raise ValueError(f"z2 has shape {tuple(z2.shape)} but z1 has {tuple(z1.shape)}; the views must pair up")
    z1n, z2n = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    if extra_pos_mask is None:
        return Fn.nt_xent(z1n, z2n, temperature, backend=backend)
    n = 2 * z1.shape[0]
    check.tensor(extra_pos_mask, "extra_pos_mask")
    if extra_pos_mask.shape != (n, n):
        raise ValueError(f"extra_pos_mask must have shape [{n}, {n}] (2N×2N over cat(z1, z2)), "
                         f"got {tuple(extra_pos_mask.shape)}")
    if extra_pos_mask.is_floating_point() or extra_pos_mask.is_complex():
        raise TypeError(f"extra_pos_mask must be a bool (or 0/1 integer) mask, got {extra_pos_mask.dtype}")
    if extra_pos_mask.dtype != torch.bool:
        if not bool(((extra_pos_mask == 0) | (extra_pos_mask == 1)).all()):
            raise ValueError("extra_pos_mask must hold only 0 and 1")
        extra_pos_mask = extra_pos_mask.bool()
    idx = torch.arange(n, device=z1.device)
    pos = extra_pos_mask.to(z1.device).clone()
    pos[idx, (idx + n // 2) % n] = True  # each row's other view is always a positive
    z = torch.cat([z1n, z2n])
    if not bool(pos.diagonal().any()):
        # Positives "same label, not self" ⇔ pos + self-loops is an equivalence relation; then a row's
        # label is the first column of its class, and the mask is exactly label equality off the diagonal.
        labels = (pos | torch.eye(n, dtype=torch.bool, device=pos.device)).to(torch.uint8).argmax(dim=1)
        same = labels[:, None] == labels[None, :]
        same.fill_diagonal_(False)
        if torch.equal(same, pos):
            return Fn.supcon_loss(z, labels, temperature, backend=backend)
    return _masked_simclr(z, pos, temperature)


def _simclr_by_index(z: torch.Tensor, indexes: torch.Tensor, temperature, backend) -> torch.Tensor:
    """solo-learn main's SimCLR: rows of z (all crops) with equal ``indexes`` are positives of each other.

    Row i's loss is −log(Σ_{j≠i, same index} e^{s_ij} / Σ_{j≠i} e^{s_ij}), s = normalize(z)·normalize(z)ᵀ/τ,
    averaged over rows. With exactly two crops per index (SimCLR's two views, in any row order) that is
    NT-Xent, which runs fused on the two views picked out by index; other layouts (multi-crop, a lone crop)
    take the formula on the N×N matrix, as solo does (a crop without a positive gives an infinite loss there too).
    """
    check.features(z, "z")
    if indexes.dim() != 1 or indexes.shape[0] != z.shape[0]:
        raise ValueError(f"indexes must be a 1-D integer tensor with one entry per row of z ({z.shape[0]}), "
                         f"got shape {tuple(indexes.shape)}")
    _single_process("simclr_loss_func")
    zn = F.normalize(z, dim=-1)
    indexes = indexes.to(z.device)
    _, inverse, counts = torch.unique(indexes, return_inverse=True, return_counts=True)
    if bool((counts == 2).all()):
        # The first and the second row of each index, in index order: a permutation of NT-Xent's rows.
        order = torch.argsort(inverse, stable=True)
        return Fn.nt_xent(zn[order[0::2]], zn[order[1::2]], temperature, backend=backend)
    temperature = check.positive_scalar(temperature, "temperature", z.device)
    logits = zn @ zn.T / temperature
    self_mask = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    pos = (indexes[:, None] == indexes[None, :]) & ~self_mask
    lse_all = torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1)
    lse_pos = torch.logsumexp(logits.masked_fill(~pos, float("-inf")), dim=1)
    return (lse_all - lse_pos).mean()


def _masked_simclr(z: torch.Tensor, pos: torch.Tensor, temperature) -> torch.Tensor:
    """solo's formula for any positive mask (a self-positive on the diagonal included): row i's loss is
    −mean over its positives j of (z_i·z_j/τ − LSE_{k≠i} z_i·z_k/τ); the mean is over rows."""
    temperature = check.positive_scalar(temperature, "temperature", z.device)
    logits = z @ z.T / temperature
    self_mask = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    per_row = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(dim=1) / pos.sum(dim=1)
    return -per_row.mean()


def moco_loss_func(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature=0.1, *,
                   backend: Optional[str] = None) -> torch.Tensor:
    """MoCo's loss; ``queue`` is solo's D×K buffer (column k is negative k). Runs ``moco_loss`` on queue.T."""
    check.features(query, "query")
    check.features(queue, "queue")
    if queue.shape[0] != query.shape[1]:
        raise ValueError(f"queue has shape {tuple(queue.shape)}; solo-learn's queue is D×K (feature dim first), "
                         f"so its first dimension must be query's feature dim {query.shape[1]}")
    if queue.requires_grad:
        # solo's queue is a buffer of past keys; moco_loss gives it no gradient, so refuse rather than drop one.
        raise ValueError("queue requires grad; moco_loss_func treats it as a constant buffer: pass queue.detach()")
    return Fn.moco_loss(query, key, queue.T, temperature, backend=backend)


def mocov2plus_loss_func(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature=0.1, *,
                         backend: Optional[str] = None) -> torch.Tensor:
    """solo-learn main's name for MoCo v2+'s loss: the same formula as :func:`moco_loss_func` (queue D×K)."""
    return moco_loss_func(query, key, queue, temperature, backend=backend)


def mocov3_loss_func(query: torch.Tensor, key: torch.Tensor, temperature=0.2, *,
                     backend: Optional[str] = None) -> torch.Tensor:
    """solo-learn main's MoCo v3 loss: InfoNCE of normalize(query) against normalize(key), positives on the
    diagonal, scaled by 2τ (as the official MoCo v3 code). On one process the keys keep their gradient, as
    solo's no-grad gather returns its input unchanged there. (solo main offsets the labels by rank 1 when
    torch.distributed is not initialized, which indexes past the logits; here one process is rank 0.)"""
    check.features(query, "query")
    check.features(key, "key")
    if query.shape != key.shape:
        raise ValueError(f"key has shape {tuple(key.shape)} but query has {tuple(query.shape)}")
    _single_process("mocov3_loss_func")
    temperature = check.positive_scalar(temperature, "temperature", query.device)
    loss = Fn.info_nce(F.normalize(query, dim=1), F.normalize(key, dim=1), temperature, backend=backend)
    return loss * (2 * temperature)


def _check_simplified(simplified) -> None:
    if not isinstance(simplified, bool):
        raise TypeError(f"simplified must be a bool, got {type(simplified).__name__}")


def byol_loss_func(p: torch.Tensor, z: torch.Tensor, simplified: bool = True, *,
                   backend: Optional[str] = None) -> torch.Tensor:
    """BYOL's loss 2 − 2·mean cos(p, z), z detached. ``simplified`` picks one of solo's two equal
    formulas; both are the fused cosine here."""
    _check_simplified(simplified)
    return 2 + 2 * Fn.negative_cosine_similarity(p, z, backend=backend)


def simsiam_loss_func(p: torch.Tensor, z: torch.Tensor, simplified: bool = True, *,
                      backend: Optional[str] = None) -> torch.Tensor:
    """SimSiam's loss −mean cos(p, z), z detached (``simplified`` as in byol_loss_func)."""
    _check_simplified(simplified)
    return Fn.negative_cosine_similarity(p, z, backend=backend)


def _single_process(name: str) -> None:
    if is_distributed():
        raise NotImplementedError(f"{name}: solo-learn combines the ranks' features here (all-gather / all-reduce); "
                                  "the sslkernels version is single-process only for now")


def barlow_loss_func(z1: torch.Tensor, z2: torch.Tensor, lamb: float = 5e-3, scale_loss: float = 0.025, *,
                     backend: Optional[str] = None) -> torch.Tensor:
    """Barlow Twins as solo computes it: ``scale_loss`` × the reference loss with off-diagonal weight ``lamb``.

    Across ranks solo averages the ranks' cross-correlations (each from its own batch-normalized rows) before
    the loss: that needs the D×D matrix itself, so there it is solo's own computation, not the fused op.
    """
    lamb, scale_loss = check.loss_weight(lamb, "lamb"), check.loss_weight(scale_loss, "scale_loss")  # solo's names
    if is_distributed():
        Fn._pair("z1", z1, "z2", z2, same_rows=True)
        return scale_loss * barlow_twins_across_ranks(z1, z2, lamb, differentiable_reduce=False)
    return scale_loss * Fn.barlow_twins_loss(z1, z2, lamb, backend=backend)


def vicreg_loss_func(z1: torch.Tensor, z2: torch.Tensor, sim_loss_weight: float = 25.0,
                     var_loss_weight: float = 25.0, cov_loss_weight: float = 1.0, *,
                     backend: Optional[str] = None) -> torch.Tensor:
    """VICReg as solo computes it. solo sums the two views' variance hinges where the reference code
    averages them, so its variance weight is twice ``vicreg_loss``'s."""
    # By solo's names (vicreg_loss says sim/var/cov_weight, and would report the doubled variance weight).
    sim_loss_weight, var_loss_weight, cov_loss_weight = (check.loss_weight(w, name) for w, name in (
        (sim_loss_weight, "sim_loss_weight"), (var_loss_weight, "var_loss_weight"),
        (cov_loss_weight, "cov_loss_weight")))
    return Fn.vicreg_loss(z1, z2, sim_loss_weight, 2 * var_loss_weight, cov_loss_weight, backend=backend)
