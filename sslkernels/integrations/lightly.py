"""sslkernels' drop-ins for lightly (tested against lightly 1.6.0), and ``patch()`` / ``unpatch()`` to swap
them into lightly's namespaces, in the manner of Liger-Kernel's ``apply_liger_kernel_to_*``::

    import sslkernels.integrations.lightly as sk_lightly
    sk_lightly.patch()                  # lightly.loss.NTXentLoss is now sslkernels.nn.NTXentLoss, ...
    from lightly.loss import NTXentLoss  # names looked up after patch() get the sslkernels classes

``patch()`` rebinds module attributes, so it reaches code that looks the names up after it runs (``from
lightly.loss import NTXentLoss`` executed later, ``lightly.loss.NTXentLoss(...)``, lightly's own modules,
which look their globals up at call time). Names bound before it (``from lightly.loss import X`` run
earlier) and classes that already subclass lightly's (e.g. NNMemoryBankModule) keep lightly's objects;
instances made before ``patch()`` stay lightly's. ``unpatch()`` puts back the very objects it replaced.

One exception keeps lightly working while patched: a class whose own code looks its name up in its module
(lightly 1.6.0's SwaVLoss, BarlowTwinsLoss and VICRegLoss call ``super(Name, self)``) is not rebound in the
module that defines it, since that would break lightly's class and every subclass of it; it is still
rebound in ``lightly.loss``. ``patch()`` returns what it patched.

``update_momentum`` (lightly.models.utils) is defined here; the classes live in :mod:`sslkernels.nn`.
"""
from __future__ import annotations

import importlib
import types
import warnings
from typing import Dict, List, Tuple

import torch
from torch import nn

from .. import _checks as check
from .. import nn as snn
from ..functional import ema_update_

__all__ = ["patch", "unpatch", "is_patched", "update_momentum", "TESTED_VERSION"]

TESTED_VERSION = "1.6.0"


@torch.no_grad()
def update_momentum(model: nn.Module, model_ema: nn.Module, m: float) -> None:
    """lightly.models.utils.update_momentum: for every parameter pair in ``parameters()`` order,
    ema ← m·ema + (1 − m)·model, with ``ema_update_``'s fused kernels. Buffers are left alone, as lightly
    leaves them (``ema_update_(model_ema, model, m)`` would copy them)."""
    check.module(model, "model")
    check.module(model_ema, "model_ema")
    ema, src = list(model_ema.parameters()), list(model.parameters())
    # By lightly's names (ema_update_ would say momentum / target / source).
    check.momentum(m, "m")
    if len(ema) != len(src):
        raise ValueError(f"model_ema has {len(ema)} parameters but model has {len(src)}; they must pair up")
    try:
        ema_update_(ema, src, m)
    except ValueError as err:  # shapes and the like, checked once per parameter list by ema_update_
        raise ValueError(f"{err} (target: model_ema's parameters, source: model's)") from None


# (feature switch of patch(), lightly module, attribute, replacement)
_TARGETS: Tuple[Tuple[str, str, str, object], ...] = tuple(
    [("losses", "lightly.loss", name, getattr(snn, name)) for name in (
        "NTXentLoss", "DCLLoss", "DCLWLoss", "NegativeCosineSimilarity", "DINOLoss", "SwaVLoss", "BarlowTwinsLoss",
        "VICRegLoss")]
    + [("losses", "lightly.loss.ntx_ent_loss", "NTXentLoss", snn.NTXentLoss),
       ("losses", "lightly.loss.dcl_loss", "DCLLoss", snn.DCLLoss),
       ("losses", "lightly.loss.dcl_loss", "DCLWLoss", snn.DCLWLoss),
       ("losses", "lightly.loss.dcl_loss", "negative_mises_fisher_weights", snn.negative_mises_fisher_weights),
       ("losses", "lightly.loss.negative_cosine_similarity", "NegativeCosineSimilarity",
        snn.NegativeCosineSimilarity),
       ("losses", "lightly.loss.dino_loss", "DINOLoss", snn.DINOLoss),
       ("losses", "lightly.loss.swav_loss", "SwaVLoss", snn.SwaVLoss),
       ("losses", "lightly.loss.barlow_twins_loss", "BarlowTwinsLoss", snn.BarlowTwinsLoss),
       ("losses", "lightly.loss.vicreg_loss", "VICRegLoss", snn.VICRegLoss),
       ("update_momentum", "lightly.models.utils", "update_momentum", update_momentum),
       ("memory_bank", "lightly.models.modules.memory_bank", "MemoryBankModule", snn.MemoryBankModule),
       ("memory_bank", "lightly.loss.memory_bank", "MemoryBankModule", snn.MemoryBankModule),
       # lightly's own NTXentLoss (when losses=False) looks its bank class up here at construction.
       ("memory_bank", "lightly.loss.ntx_ent_loss", "MemoryBankModule", snn.MemoryBankModule)])

# (module name, attribute) -> the lightly object patch() replaced; empty when nothing is patched.
_originals: Dict[Tuple[str, str], object] = {}


def _code_objects(obj):
    funcs = []
    if isinstance(obj, type):
        for value in vars(obj).values():
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if isinstance(value, property):
                funcs += [f for f in (value.fget, value.fset, value.fdel) if f is not None]
            elif callable(value):
                funcs.append(value)
    else:
        funcs.append(obj)
    stack = [f.__code__ for f in funcs if hasattr(f, "__code__")]
    while stack:  # nested functions and comprehensions keep their code objects in co_consts
        code = stack.pop()
        yield code
        stack += [c for c in code.co_consts if isinstance(c, types.CodeType)]


def _looks_up_own_name(obj) -> bool:
    """Whether ``obj``'s code reads its own name as a global (``super(SwaVLoss, self)``, recursion)."""
    name = getattr(obj, "__name__", None)
    return name is not None and any(name in code.co_names for code in _code_objects(obj))


def patch(*, losses: bool = True, update_momentum: bool = True, memory_bank: bool = True) -> List[str]:
    """Swap sslkernels' drop-ins into lightly: the loss classes (``losses``: NTXentLoss, DCLLoss, DCLWLoss,
    NegativeCosineSimilarity, DINOLoss, SwaVLoss, BarlowTwinsLoss, VICRegLoss and
    negative_mises_fisher_weights, in ``lightly.loss`` and their own modules),
    ``lightly.models.utils.update_momentum`` and ``MemoryBankModule`` (``lightly.models.modules.memory_bank``,
    ``lightly.loss.memory_bank``). Idempotent; returns the ``module.attribute`` names patched now.

    Names a lightly release does not have are skipped (nothing is added to lightly). A lightly other than
    the tested version gets a warning: the drop-ins follow lightly 1.6.0's semantics.
    """
    chosen = {"losses": losses, "update_momentum": update_momentum, "memory_bank": memory_bank}
    for key, flag in chosen.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{key} must be a bool, got {type(flag).__name__}")
    try:
        lightly = importlib.import_module("lightly")
    except ImportError as err:
        raise ImportError("sslkernels.integrations.lightly.patch() needs lightly installed "
                          f"(pip install lightly=={TESTED_VERSION})") from err
    version = getattr(lightly, "__version__", "unknown")
    if version != TESTED_VERSION:
        warnings.warn(f"sslkernels' lightly drop-ins follow lightly {TESTED_VERSION}; found lightly {version}, "
                      "whose classes may differ", stacklevel=2)
    done = []
    for key, module_name, attr, ours in _TARGETS:
        if not chosen[key]:
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if not hasattr(module, attr) or (module_name, attr) in _originals:
            continue  # absent in this release, or patched already
        original = getattr(module, attr)
        if getattr(original, "__module__", None) == module_name and _looks_up_own_name(original):
            continue  # rebinding would break lightly's own object (see the module docstring)
        _originals[(module_name, attr)] = original
        setattr(module, attr, ours)
        done.append(f"{module_name}.{attr}")
    return done


def unpatch() -> List[str]:
    """Put back every lightly object ``patch()`` replaced (the very same objects); returns their names.
    Without a preceding ``patch()`` it does nothing."""
    done = []
    for (module_name, attr), original in list(_originals.items()):
        setattr(importlib.import_module(module_name), attr, original)
        del _originals[(module_name, attr)]
        done.append(f"{module_name}.{attr}")
    return done


def is_patched() -> bool:
    """Whether any lightly name is currently replaced by ``patch()``."""
    return bool(_originals)
