"""The parameters and buffers of two modules of one architecture, paired by name (ema_update_'s module form).

Walking both modules (named_parameters and named_buffers of each) costs ~1 ms of host time for ResNet-50's
151 modules: several times its EMA kernel on a GPU, on every step. So the walk is kept per (target, source) and
reused while both trees still hold the very same submodules, parameters and buffers under the same names,
which every call checks by identity (~0.3 ms). No hook is trusted to report changes: `Module._apply` under
`torch.__future__.set_overwrite_module_params_on_conversion(True)` writes new Parameters straight into
`_parameters`, past the registration hooks; a swapped layer, a new buffer or a parametrization is seen the
same way.
"""
from __future__ import annotations

import weakref
from itertools import chain
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

# Prefixes that wrappers put before every name: DDP / DataParallel ("module."), torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = {"module.": "DDP / DataParallel, e.g. ddp_model.module",
                     "_orig_mod.": "torch.compile, e.g. compiled_model._orig_mod"}

# What the walk reads: a module class that overrides any of these may name its tensors otherwise than its
# dicts say (FSDP1 strips its prefixes), so such trees are walked afresh on every call.
_WALK_METHODS = ("named_parameters", "named_buffers", "named_modules", "_named_members", "parameters", "buffers")


def _unwrapped(name: str) -> str:
    while name.startswith(tuple(_WRAPPER_PREFIXES)):
        name = name.split(".", 1)[1]
    return name


def _names_mismatch(kind: str, t: dict, s: dict) -> str:
    only_t, only_s = sorted(set(t) - set(s)), sorted(set(s) - set(t))
    msg = (f"target and source modules differ in {kind}: only the target has {only_t[:4]}, "
           f"only the source has {only_s[:4]}")
    if {_unwrapped(k) for k in t} == {_unwrapped(k) for k in s}:
        # The same names under a wrapper's prefix: say which side is wrapped and how to unwrap it.
        for side, names in (("target", only_t), ("source", only_s)):
            wrapped = [p for p in _WRAPPER_PREFIXES if any(n.startswith(p) for n in names)]
            if wrapped:
                how = "; ".join(f"{p!r} from {_WRAPPER_PREFIXES[p]}" for p in wrapped)
                msg += (f". The {side}'s names carry a wrapper prefix ({how}): pass the unwrapped module "
                        "(the one the EMA copy was made from)")
                break
    return msg


Named = Tuple[List[str], List[torch.Tensor], List[torch.Tensor]]  # names, target tensors, source tensors


def _walk(target: nn.Module, source: nn.Module) -> Tuple[Named, Named]:
    """(parameters, buffers) of the two modules, paired by name; ValueError when the names differ."""
    tp, sp = dict(target.named_parameters()), dict(source.named_parameters())
    tb, sb = dict(target.named_buffers()), dict(source.named_buffers())
    for kind, t, s in (("parameters", tp, sp), ("buffers", tb, sb)):
        if t.keys() != s.keys():
            raise ValueError(_names_mismatch(kind, t, s))
    return (list(tp), list(tp.values()), [sp[k] for k in tp]), (list(tb), list(tb.values()), [sb[k] for k in tb])


def _tree(root: nn.Module) -> Optional[list]:
    """The modules a walk of ``root`` visits (the root first), or None when one overrides the walk or keeps its
    tensors elsewhere than in dicts (a TorchScript module's are views of its C++ object)."""
    modules = [m for _, m in root.named_modules()]
    for m in modules:
        cls = type(m)
        if any(getattr(cls, name) is not getattr(nn.Module, name) for name in _WALK_METHODS):
            return None
        if not all(isinstance(d, dict) for d in (m._parameters, m._buffers, m._modules)):
            return None
    return modules


def _state(modules: list) -> list:
    """Names and object identities in every parameter, buffer and submodule dict of the tree, in order."""
    dicts = [d for m in modules for d in (m._parameters, m._buffers, m._modules)]
    return [*chain.from_iterable(dicts), *map(id, chain.from_iterable(map(dict.values, dicts)))]


class _Walk:
    """One (target, source) pair's walk and the tree state it was read from, all held weakly: a submodule that
    refers back to its root (an attribute, not a child) must not keep the root, and so this entry, alive; a
    parameter replaced between calls must not stay in memory because the entry still lists it. Roots are the
    cache's keys and come with each call."""
    __slots__ = ("names", "tensors", "submodules", "state")

    def __init__(self, params: Named, buffers: Named, trees: Tuple[list, list]):
        self.names = (params[0], buffers[0])
        # Parameters of target and source, then buffers of target and source.
        self.tensors = tuple([weakref.ref(t) for t in ts] for ts in (params[1], params[2], buffers[1], buffers[2]))
        self.submodules = tuple([weakref.ref(m) for m in tree[1:]] for tree in trees)
        self.state = (_state(trees[0]), _state(trees[1]))

    def pairs(self, target: nn.Module, source: nn.Module) -> Optional[Tuple[Named, Named]]:
        """The walk again when both trees are as it found them, else None."""
        trees = []
        for root, refs in zip((target, source), self.submodules):
            tree = [root, *[r() for r in refs]]
            if any(m is None for m in tree):
                return None
            trees.append(tree)
        tensors = [[r() for r in refs] for refs in self.tensors]
        if any(t is None for ts in tensors for t in ts):
            return None
        # Identities are sound: every object the state names is alive (checked just above), so no new object
        # can have taken one of their ids.
        if _state(trees[0]) != self.state[0] or _state(trees[1]) != self.state[1]:
            return None
        return (self.names[0], *tensors[:2]), (self.names[1], *tensors[2:])


# (id(target), id(source)) -> (target ref, source ref, _Walk). Keyed by identity, not by the modules (a module
# class may define __eq__ / __hash__ by value); weak on both, and either one's death drops the entry, so a
# dropped model takes its entry, and its ids, with it.
_walks: Dict[Tuple[int, int], Tuple[weakref.ref, weakref.ref, _Walk]] = {}


def _forget(key: Tuple[int, int]):
    return lambda _ref: _walks.pop(key, None)


def named_pairs(target: nn.Module, source: nn.Module) -> Tuple[Named, Named]:
    """(parameters, buffers) of two modules of one architecture as (names, target tensors, source tensors),
    from the kept walk while both trees are unchanged. The name lists are shared with the cache: read only."""
    if torch.compiler.is_compiling():  # Dynamo traces the plain walk; ids and weak references are host-side
        return _walk(target, source)
    key = (id(target), id(source))
    entry = _walks.get(key)
    if entry is not None and entry[0]() is target and entry[1]() is source:
        kept = entry[2].pairs(target, source)
        if kept is not None:
            return kept
    params, buffers = _walk(target, source)
    trees = (_tree(target), _tree(source))
    if trees[0] is not None and trees[1] is not None:
        _walks[key] = (weakref.ref(target, _forget(key)), weakref.ref(source, _forget(key)),
                       _Walk(params, buffers, trees))
    else:
        _walks.pop(key, None)
    return params, buffers
