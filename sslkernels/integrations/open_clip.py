"""Swap sslkernels' ClipLoss / SigLipLoss into OpenCLIP (tested with open_clip_torch 3.3.0).

    import sslkernels.integrations.open_clip as oc
    oc.patch()                  # open_clip.create_loss(args) now builds sslkernels' losses
    ...
    oc.unpatch()                # every name back to OpenCLIP's own class

``patch()`` rebinds the names where OpenCLIP looks the classes up: ``open_clip.loss`` (the definitions),
``open_clip.factory`` (``create_loss`` reads its own module globals) and the package top level where it
exports them. It is idempotent, and ``unpatch()`` restores exactly what was there. Not affected: loss
objects built before the patch, and OpenCLIP's CoCaLoss / DistillClipLoss, which subclass OpenCLIP's own
ClipLoss (``create_loss`` still returns them for CoCa and distillation runs). Importing sslkernels never
imports OpenCLIP; ``patch()`` does.
"""
from __future__ import annotations

import importlib

from .. import nn as _nn

# Modules whose ClipLoss / SigLipLoss names patch() rebinds, and our class for each name.
_TARGETS = ("open_clip.loss", "open_clip.factory", "open_clip")
_OURS = {"ClipLoss": _nn.ClipLoss, "SigLipLoss": _nn.SigLipLoss}
_saved: dict = {}  # (module name, attribute) -> OpenCLIP's object, while patched


def patch(clip_loss: bool = True, siglip_loss: bool = True) -> None:
    """Make OpenCLIP build sslkernels' ClipLoss (``clip_loss``) and SigLipLoss (``siglip_loss``)."""
    for key, flag in (("clip_loss", clip_loss), ("siglip_loss", siglip_loss)):
        if not isinstance(flag, bool):
            raise TypeError(f"{key} must be a bool, got {type(flag).__name__}")
    names = [n for n, on in (("ClipLoss", clip_loss), ("SigLipLoss", siglip_loss)) if on]
    for mod_name in _TARGETS:
        mod = importlib.import_module(mod_name)
        for name in names:
            # Only names the module has: unpatch() must not leave new attributes behind.
            if (mod_name, name) not in _saved and hasattr(mod, name):
                _saved[(mod_name, name)] = getattr(mod, name)
                setattr(mod, name, _OURS[name])


def unpatch() -> None:
    """Put OpenCLIP's own classes back (a no-op when nothing is patched)."""
    for (mod_name, name), original in list(_saved.items()):
        setattr(importlib.import_module(mod_name), name, original)
        del _saved[(mod_name, name)]


def is_patched() -> bool:
    return bool(_saved)
