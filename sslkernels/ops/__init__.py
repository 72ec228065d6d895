"""Kernel families. Importing this package registers every implementation with sslkernels.backends.

"torch" (the eager reference) exists for every op; each module below adds the fused kinds it has.
"""
from .. import reference as _reference
from ..backends import register as _register

_OPS = (
    "info_nce", "nt_xent", "clip_loss", "siglip_loss", "moco_loss", "supcon_loss",
    "negative_cosine_similarity", "dino_loss", "update_center_", "sinkhorn_knopp",
    "barlow_twins_loss", "vicreg_loss", "ema_update_", "queue_enqueue_", "similarity", "knn_topk", "rankme",
)
for _name in _OPS:
    _register(_name, "torch")(getattr(_reference, _name))

from . import contrastive_cpu, cross_correlation, dino_cpu, knn_cpu  # noqa: E402,F401

# Triton kernel families: without Triton installed, their ops keep their other backends.
import importlib as _importlib  # noqa: E402

for _module in ("contrastive", "cosine", "dino", "ema", "queue", "similarity", "sinkhorn"):
    try:
        _importlib.import_module(f"{__name__}.{_module}")
    except ImportError as _err:  # pragma: no cover - depends on the environment
        if "triton" not in str(_err):
            raise
