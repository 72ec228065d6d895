"""sslkernels: fused GPU kernels for self-supervised learning losses and training-state ops.

The public API is docs/API.md; this module re-exports it.
"""
from . import nn
from .backends import get_backend, set_backend
from .functional import (
    barlow_twins_loss, clip_loss, dino_loss, ema_update_, info_nce, knn_topk, moco_loss,
    negative_cosine_similarity, nt_xent, rankme, siglip_loss, similarity, sinkhorn_knopp, supcon_loss,
    swav_loss, update_center_, vicreg_loss,
)
from .state import MemoryQueue, MomentumEncoder

__version__ = "0.1.0"

__all__ = [
    "info_nce", "nt_xent", "clip_loss", "siglip_loss", "moco_loss", "supcon_loss",
    "negative_cosine_similarity", "dino_loss", "update_center_", "sinkhorn_knopp", "swav_loss",
    "barlow_twins_loss", "vicreg_loss", "ema_update_", "MomentumEncoder", "MemoryQueue",
    "similarity", "knn_topk", "rankme", "set_backend", "get_backend", "nn",
]
