"""Swap sslkernels' ModelEmaV3 (fused multi-tensor EMA) into timm (tested with timm 1.0.31).

    import sslkernels.integrations.timm as st
    st.patch()        # timm.utils.ModelEmaV3(model, ...) now builds sslkernels.nn.ModelEmaV3
    ...
    st.unpatch()      # timm's own class back everywhere

``patch()`` rebinds ``ModelEmaV3`` in ``timm.utils.model_ema`` (the definition), ``timm.utils`` (what
timm's train.py uses) and ``timm.task.task`` (the task API imports the name directly). Idempotent;
``unpatch()`` restores exactly what was there. Objects built before the patch keep timm's class; the
state dicts of the two classes are interchangeable. Importing sslkernels never imports timm; ``patch()`` does.
"""
from __future__ import annotations

import importlib

from .. import nn as _nn

_TARGETS = ("timm.utils.model_ema", "timm.utils", "timm.task.task")
_saved: dict = {}  # module name -> timm's ModelEmaV3, while patched


def _modules():
    for name in _TARGETS:
        try:
            yield name, importlib.import_module(name)
        except ImportError:  # timm.task exists only in recent timm releases
            continue


def patch() -> None:
    """Make timm build sslkernels.nn.ModelEmaV3 wherever it names ModelEmaV3."""
    for name, mod in _modules():
        if name not in _saved and hasattr(mod, "ModelEmaV3"):
            _saved[name] = mod.ModelEmaV3
            mod.ModelEmaV3 = _nn.ModelEmaV3


def unpatch() -> None:
    """Put timm's own ModelEmaV3 back (a no-op when nothing is patched)."""
    for name, original in list(_saved.items()):
        importlib.import_module(name).ModelEmaV3 = original
        del _saved[name]


def is_patched() -> bool:
    return bool(_saved)
