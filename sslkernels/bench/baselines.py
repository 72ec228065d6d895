"""Baselines: what users write today without a kernel library (``--impl baselines``).

Unlike peers (peers.py) these need no package: they are the forms found in the methods' own code,
written out here so every machine times them. They go through the same harness as every other
implementation (impls.build_callables, timing.measure, the memory worker), so their times and peak
memory are measured exactly as ours are.

  foreach_lerp  ``torch._foreach_lerp_(targets, sources, 1 - m)``: PyTorch's fused multi-tensor lerp, the
                fastest EMA in plain PyTorch (timm's ModelEmaV3 and lightly's newer utilities use it)
  python_loop   one update per parameter, as lightly's ``update_momentum`` and the official MoCo code do:
                ``p_t.data = p_t.data * m + p_s.data * (1. - m)`` (three temporaries per parameter, one
                rebinding of ``.data``); lightly measured 47.6 s vs 4.1 s against foreach over 3178 steps
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

import torch
from torch import nn

from .cases import Inputs, Size
from .peers import Unsupported


@dataclass(frozen=True)
class Baseline:
    name: str
    make: Callable[[Inputs, Size, torch.device], Callable[[], Any]]
    note: str = ""


def _foreach_lerp(inp: Inputs, size: Size, device):
    targets, sources, m = inp.args[0], inp.args[1], inp.args[2]
    if any(t.dtype != s.dtype for t, s in zip(targets, sources)):
        raise Unsupported("torch._foreach_lerp_ needs target and source of one dtype")
    w = 1.0 - float(m)

    @torch.no_grad()
    def call():
        torch._foreach_lerp_(targets, sources, w)
    return call


def _python_loop(inp: Inputs, size: Size, device):
    # nn.Parameters over the case's tensors, as a model's parameters() would yield them.
    target = nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in inp.args[0]])
    source = nn.ParameterList([nn.Parameter(s, requires_grad=False) for s in inp.args[1]])
    m = float(inp.args[2])

    @torch.no_grad()
    def update_momentum():
        for p_t, p_s in zip(target.parameters(), source.parameters()):
            p_t.data = p_t.data * m + p_s.data * (1.0 - m)
    return update_momentum


BASELINES: Dict[str, Tuple[Baseline, ...]] = {
    "ema_update_": (
        Baseline("foreach_lerp", _foreach_lerp, note="torch._foreach_lerp_(targets, sources, 1 - m)"),
        Baseline("python_loop", _python_loop,
                 note="per-parameter p_t.data = p_t.data * m + p_s.data * (1 - m) (lightly / official MoCo)"),
    ),
}


def baselines_for(op: str) -> Tuple[Baseline, ...]:
    return BASELINES.get(op, ())
