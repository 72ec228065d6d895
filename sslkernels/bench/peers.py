"""Adapters for other libraries' implementations of the same jobs (benchmarked when importable).

Each adapter turns a case's inputs into a zero-argument callable that does what the peer's users
write, from the peer's documented API. A missing package raises ImportError (the run records
"not installed: pip install ..."); a peer that cannot run the case raises :class:`Unsupported`.
Where a peer does a little more or less than our op, ``note`` says so (it goes into the results).

  Inf-CL            inf_cl.cal_flash_loss(q, k, labels=None, scale=None, head_dim=256): per-row loss of
                    one direction, single GPU (cal_inf_loss needs torch.distributed)
  OpenCLIP          open_clip.loss.ClipLoss()(image, text, logit_scale),
                    SigLipLoss()(image, text, logit_scale, logit_bias)
  lightly           lightly.loss.{NTXentLoss, SupConLoss, NegativeCosineSimilarity, DINOLoss, BarlowTwinsLoss,
                    VICRegLoss}, lightly.loss.swav_loss.sinkhorn, MemoryBankModule, lightly.models.utils.update_momentum
  timm              timm.utils.ModelEmaV3(model, decay).update(model)
  cut-cross-entropy cut_cross_entropy.linear_cross_entropy(e, c, targets): CE(e @ c.T, targets) without the
                    logits, used as one-direction InfoNCE with e = q/τ, c = k
  torch             torch.nn.functional.linear_cross_entropy (where this torch has it), the same way
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn

from .cases import Inputs, Size


class Unsupported(Exception):
    """The peer exists but cannot run this case (device, shape, dtype); the message says why."""


@dataclass(frozen=True)
class Peer:
    name: str
    package: str                                              # what to pip install
    module: str                                               # its top-level import name
    make: Callable[[Inputs, Size, torch.device], Callable[[], Any]]
    cuda_only: bool = False
    note: str = ""


# ------------------------------------------------------------------------------------------ Inf-CL


def _inf_cl_head_dim(d: int) -> int:
    # cal_flash_loss views rows as (heads, head_dim); tl.dot needs head_dim >= 16.
    for hd in (256, 128, 64, 32, 16):
        if d % hd == 0:
            return hd
    raise Unsupported(f"Inf-CL needs D divisible by 16, got D={d}")


def _inf_cl_info_nce(inp: Inputs, size: Size, device):
    from inf_cl import cal_flash_loss

    q, k, tau = inp.args[0], inp.args[1], inp.args[2]
    hd = _inf_cl_head_dim(q.shape[1])
    return lambda: cal_flash_loss(q, k, None, 1.0 / tau, hd).mean()


def _inf_cl_clip(inp: Inputs, size: Size, device):
    from inf_cl import cal_flash_loss

    i, t, scale = inp.args[0], inp.args[1], inp.args[2]
    hd = _inf_cl_head_dim(i.shape[1])
    return lambda: 0.5 * (cal_flash_loss(i, t, None, scale, hd) + cal_flash_loss(t, i, None, scale, hd)).mean()


# ----------------------------------------------------------------------------------------- OpenCLIP


def _open_clip_clip(inp: Inputs, size: Size, device):
    from open_clip.loss import ClipLoss

    loss = ClipLoss()
    i, t, scale = inp.args[0], inp.args[1], inp.args[2]
    return lambda: loss(i, t, scale)


def _open_clip_siglip(inp: Inputs, size: Size, device):
    from open_clip.loss import SigLipLoss

    loss = SigLipLoss()
    i, t, scale, bias = inp.args[:4]
    return lambda: loss(i, t, scale, bias)


# ------------------------------------------------------------------------------------------ lightly


def _lightly_nt_xent(inp: Inputs, size: Size, device):
    from lightly.loss import NTXentLoss

    loss = NTXentLoss(temperature=inp.extra["temperature"])
    z1, z2 = inp.args[0], inp.args[1]
    return lambda: loss(z1, z2)


def _with_bank_shape(make, k: int, dim: int):
    # Newer lightly takes the bank shape (size, dim); older versions only an int and size the bank lazily.
    try:
        return make((k, dim))
    except (TypeError, ValueError):
        return make(k)


def _fill_bank(module: nn.Module, queue: torch.Tensor) -> None:
    # Start from the case's queue (feature-major or row-major, whichever this lightly keeps), so
    # outputs compare; banks that lightly sizes lazily keep their own random start.
    holder = getattr(module, "memory_bank", module)  # newer NTXentLoss holds a MemoryBankModule
    bank = getattr(holder, "bank", None)
    with torch.no_grad():
        if isinstance(bank, torch.Tensor) and bank.shape == queue.T.shape:
            bank.copy_(queue.T)
        elif isinstance(bank, torch.Tensor) and bank.shape == queue.shape:
            bank.copy_(queue)


def _lightly_moco(inp: Inputs, size: Size, device):
    from lightly.loss import NTXentLoss

    q, k = inp.args[0], inp.args[1]
    tau = inp.extra["temperature"]
    loss = _with_bank_shape(lambda s: NTXentLoss(temperature=tau, memory_bank_size=s),
                            size.dims["K"], size.dims["D"]).to(device)
    _fill_bank(loss, inp.args[2])
    return lambda: loss(q, k)


def _lightly_supcon(inp: Inputs, size: Size, device):
    try:
        from lightly.loss import SupConLoss
    except ImportError:  # some releases have the module but do not export the class
        from lightly.loss.supcon_loss import SupConLoss

    f, labels = inp.args[0], inp.extra["labels"]
    n = f.shape[0]
    if n % 2:
        raise Unsupported("lightly's SupConLoss takes two views of equal size: N must be even")
    loss = SupConLoss(temperature=inp.extra["temperature"], rescale=False)
    half = n // 2
    return lambda: loss(f[:half], f[half:], labels[:half])


def _lightly_negcos(inp: Inputs, size: Size, device):
    from lightly.loss import NegativeCosineSimilarity

    loss = NegativeCosineSimilarity()
    p, z = inp.args[0], inp.args[1]
    return lambda: loss(p, z)


def _lightly_dino(inp: Inputs, size: Size, device):
    from lightly.loss import DINOLoss

    student, teacher = inp.args[0], inp.args[1]
    x = inp.extra
    loss = DINOLoss(output_dim=student.shape[1], warmup_teacher_temp=x["teacher_temp"],
                    teacher_temp=x["teacher_temp"], student_temp=x["student_temp"]).to(device)
    with torch.no_grad():  # start from the case's centre (lightly starts from zeros), so outputs compare
        loss.center.copy_(inp.args[2].reshape(loss.center.shape))
    n_t, n_s = x["n_global_crops"], x["n_crops"]
    return lambda: loss(list(teacher.chunk(n_t)), list(student.chunk(n_s)))


def _lightly_sinkhorn(inp: Inputs, size: Size, device):
    from lightly.loss.swav_loss import sinkhorn

    scores = inp.args[0]
    return lambda: sinkhorn(scores, iterations=inp.extra["iterations"], epsilon=inp.extra["epsilon"])


def _lightly_barlow(inp: Inputs, size: Size, device):
    from lightly.loss import BarlowTwinsLoss

    loss = BarlowTwinsLoss(lambda_param=inp.args[2])
    z1, z2 = inp.args[0], inp.args[1]
    return lambda: loss(z1, z2)


def _lightly_vicreg(inp: Inputs, size: Size, device):
    from lightly.loss import VICRegLoss

    sim, var, cov = inp.args[2:5]
    loss = VICRegLoss(lambda_param=sim, mu_param=var, nu_param=cov)
    z1, z2 = inp.args[0], inp.args[1]
    return lambda: loss(z1, z2)


def _param_module(tensors: List[torch.Tensor]) -> nn.Module:
    # Parameters that share storage with the case's tensors, for APIs that take modules.
    return nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in tensors])


def _lightly_ema(inp: Inputs, size: Size, device):
    from lightly.models.utils import update_momentum

    target, source = _param_module(inp.args[0]), _param_module(inp.args[1])
    m = inp.extra["momentum"]
    return lambda: update_momentum(source, target, m)


def _lightly_enqueue(inp: Inputs, size: Size, device):
    try:
        from lightly.models.modules.memory_bank import MemoryBankModule
    except ImportError:
        from lightly.loss.memory_bank import MemoryBankModule

    queue, keys = inp.args[0], inp.args[2]
    bank = _with_bank_shape(lambda s: MemoryBankModule(size=s), queue.shape[0], queue.shape[1]).to(device)
    _fill_bank(bank, queue)
    return lambda: bank(keys, update=True)


# --------------------------------------------------------------------------------------------- timm


def _timm_ema(inp: Inputs, size: Size, device):
    from timm.utils import ModelEmaV3

    source = _param_module(inp.args[1])
    ema = ModelEmaV3(source, decay=inp.extra["momentum"])  # keeps its own copy as the target
    return lambda: ema.update(source)


# ------------------------------------------------------------------------------ linear cross-entropy


def _one_direction_targets(inp: Inputs, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    q, k, tau = inp.args[0], inp.args[1], inp.args[2]
    if q.shape[0] != k.shape[0]:
        raise Unsupported("needs N == M (positives on the diagonal)")
    return q, k, torch.arange(q.shape[0], device=device), 1.0 / tau


def _cce_info_nce(inp: Inputs, size: Size, device):
    from cut_cross_entropy import linear_cross_entropy

    q, k, targets, inv_tau = _one_direction_targets(inp, device)
    return lambda: linear_cross_entropy(q * inv_tau, k, targets)


def _torch_lce_info_nce(inp: Inputs, size: Size, device):
    fn = getattr(torch.nn.functional, "linear_cross_entropy", None)
    if fn is None:
        raise ImportError("torch.nn.functional.linear_cross_entropy is not in this torch")
    q, k, targets, inv_tau = _one_direction_targets(inp, device)
    return lambda: fn(q * inv_tau, k, targets)


# ---------------------------------------------------------------------------------------- registry

_LCE_NOTE = "one-direction InfoNCE as linear cross-entropy of q/τ against the keys"

_LIGHTLY = ("lightly", "lightly", "lightly")  # name, pip package, import name

PEERS: Dict[str, Tuple[Peer, ...]] = {
    "info_nce": (
        Peer("inf_cl", "inf_cl", "inf_cl", _inf_cl_info_nce, cuda_only=True,
             note="cal_flash_loss (one GPU), fp32 inside"),
        Peer("cut_cross_entropy", "cut-cross-entropy", "cut_cross_entropy", _cce_info_nce, cuda_only=True,
             note=_LCE_NOTE),
        Peer("torch.linear_cross_entropy", "torch>=2.13", "torch", _torch_lce_info_nce, note=_LCE_NOTE),
    ),
    "clip_loss": (
        Peer("open_clip", "open_clip_torch", "open_clip", _open_clip_clip),
        Peer("inf_cl", "inf_cl", "inf_cl", _inf_cl_clip, cuda_only=True,
             note="two cal_flash_loss calls (image→text, text→image)"),
    ),
    "siglip_loss": (Peer("open_clip", "open_clip_torch", "open_clip", _open_clip_siglip),),
    "nt_xent": (Peer(*_LIGHTLY, _lightly_nt_xent, note="normalizes its inputs"),),
    "moco_loss": (Peer(*_LIGHTLY, _lightly_moco,
                       note="NTXentLoss with a memory bank: normalizes inputs and also enqueues the keys"),),
    "supcon_loss": (Peer(*_LIGHTLY, _lightly_supcon, note="two-view SupConLoss; normalizes its inputs"),),
    "negative_cosine_similarity": (Peer(*_LIGHTLY, _lightly_negcos, note="no stop-gradient inside"),),
    "dino_loss": (Peer(*_LIGHTLY, _lightly_dino, note="also updates its centre in the forward"),),
    "sinkhorn_knopp": (Peer(*_LIGHTLY, _lightly_sinkhorn, note="swav_loss.sinkhorn (exp domain)"),),
    "barlow_twins_loss": (Peer(*_LIGHTLY, _lightly_barlow),),
    "vicreg_loss": (Peer(*_LIGHTLY, _lightly_vicreg),),
    "ema_update_": (
        Peer(*_LIGHTLY, _lightly_ema, note="update_momentum: a new tensor per parameter per step"),
        Peer("timm", "timm", "timm", _timm_ema, note="ModelEmaV3 (foreach lerp) on its own copy of the target"),
    ),
    "MemoryQueue.enqueue_": (Peer(*_LIGHTLY, _lightly_enqueue,
                                  note="MemoryBankModule (host-side pointer, its own bank layout)"),),
}


def peers_for(op: str) -> Tuple[Peer, ...]:
    return PEERS.get(op, ())
