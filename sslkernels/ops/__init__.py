"""Kernel families. Importing this package registers every implementation with sslkernels.backends.

"torch" (the eager reference) exists for every op; each module below adds the fused kinds it has.
"""
from .. import reference as _reference
from ..backends import register as _register

_OPS = (
    "info_nce", "nt_xent", "clip_loss", "siglip_loss", "moco_loss", "supcon_loss",
    "negative_cosine_similarity", "dino_loss", "update_center_", "sinkhorn_knopp",
    "barlow_twins_loss", "vicreg_loss", "ema_update_", "similarity", "knn_topk", "rankme",
)
for _name in _OPS:
    _register(_name, "torch")(getattr(_reference, _name))

from . import contrastive_cpu, knn_cpu  # noqa: E402,F401
