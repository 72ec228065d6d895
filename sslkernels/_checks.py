"""Argument validation shared by every public op: one place for the error messages.

Public functions validate once at the boundary; implementations assume valid input. Value checks on
tensors (temperature > 0, targets in range) cost one small host sync; they are skipped while a CUDA
graph is being captured, where a sync is illegal, and while torch.compile traces, where the tensors are
fake and a read would break the graph (the custom ops of library.py run them when the graph runs).
"""
from __future__ import annotations

import bisect
import collections
import math
import operator
from numbers import Real
from typing import Optional, Sequence, Union

import torch

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

Scalar = Union[float, torch.Tensor]


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _values_readable() -> bool:
    return not (torch.compiler.is_compiling() or _capturing())


values_readable = _values_readable  # for checks made elsewhere (distributed.gather_sizes_and_dims)


def module(value, name: str) -> torch.nn.Module:
    if not isinstance(value, torch.nn.Module):
        raise TypeError(f"{name} must be an nn.Module, got {type(value).__name__}")
    return value


def tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def features(x, name: str, *, ndim: int = 2, min_rows: int = 1) -> torch.Tensor:
    """A floating-point feature tensor with ``ndim`` dims and at least ``min_rows`` rows and one column."""
    tensor(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if x.dim() != ndim:
        want = "[N, D]" if ndim == 2 else f"{ndim}-d"
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        what = "is empty (0 rows)" if x.shape[0] == 0 else f"has {x.shape[0]} rows"
        raise ValueError(f"{name} {what}; at least {min_rows} needed")
    if ndim == 2 and x.shape[1] == 0:
        raise ValueError(f"{name} has feature dimension 0")
    return x


def same_device(*named: tuple) -> None:
    """``named`` are (name, tensor) pairs; all tensors must share one device."""
    first_name, first = named[0]
    for name, t in named[1:]:
        if t is not None and t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; move them to one device")


def same_dtype(*named: tuple) -> None:
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; cast them to one dtype")


def same_dim(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"{b_name} has feature dimension {b.shape[-1]} but {a_name} has {a.shape[-1]}")


def same_shape(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{b_name} has shape {tuple(b.shape)} but {a_name} has {tuple(a.shape)}; they must match")


def reduction(r) -> str:
    if r not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {r!r}")
    return r


def positive_scalar(value, name: str, device: torch.device, *, per_row: Optional[int] = None) -> Scalar:
    """A positive float, a 0-d floating tensor, or (``per_row=N``) a 1-d tensor of N positive values.

    Returns a Python float or the tensor itself (kept as is so it receives a gradient).
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a floating-point tensor, got bool")
    if isinstance(value, Real):
        v = float(value)
        # Comparisons, not math.isfinite: under torch.compile a float that changed between calls arrives
        # symbolic, and Dynamo can guard on a comparison but not trace math.isfinite. NaN fails both.
        if not 0 < v < math.inf:
            raise ValueError(f"{name} must be positive and finite, got {value!r}")
        return v
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a float or a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.dim() == 1 and per_row is not None:
        if value.shape[0] != per_row:
            raise ValueError(f"{name} has length {value.shape[0]}; a per-anchor {name} needs one value per row ({per_row})")
    elif value.dim() != 0:
        # Formatted only here: under torch.compile per_row is the symbolic batch size, and formatting it would
        # guard on its value (a recompile for every batch size).
        allowed = "a 0-d tensor" if per_row is None else f"a 0-d tensor or a 1-d tensor of length {per_row}"
        raise ValueError(f"{name} must be {allowed}, got shape {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the features are on {device}")
    positive_values(value, name)
    return value


def positive_values(value: torch.Tensor, name: str) -> None:
    """Every value of ``value`` positive and finite (a host read; skipped where reads are not allowed)."""
    if _values_readable():
        v = value.detach()
        if not bool(((v > 0) & (v < math.inf)).all()):  # one host read (NaN fails both comparisons)
            raise ValueError(f"{name} must be positive and finite, got {v.flatten()[:4].tolist()}")


def finite_scalar(value, name: str, device: torch.device) -> Scalar:
    """A float or 0-d floating tensor of any sign (e.g. SigLIP's logit_bias)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a floating-point tensor, got bool")
    if isinstance(value, Real):
        if not -math.inf < float(value) < math.inf:  # comparisons, as in positive_scalar
            raise ValueError(f"{name} must be finite, got {value!r}")
        return float(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a float or a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.dim() != 0:
        raise ValueError(f"{name} must be a 0-d tensor, got shape {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the features are on {device}")
    finite_values(value, name)
    return value


def finite_values(value: torch.Tensor, name: str) -> None:
    """Every value of ``value`` finite (a host read; skipped where reads are not allowed)."""
    if _values_readable() and not bool(torch.isfinite(value.detach()).all()):
        raise ValueError(f"{name} must be finite, got {value.detach().flatten()[:4].tolist()}")


def loss_weight(value, name: str) -> float:
    """A non-negative, finite float weight of a loss term (Barlow Twins' λ, VICReg's coefficients)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point():
        if value.requires_grad:
            raise TypeError(f"{name} must be a float; a tensor that requires grad would get no gradient here")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0 <= float(value) < math.inf:  # comparisons, as in positive_scalar
        raise ValueError(f"{name} must be non-negative and finite, got {value!r}")
    return float(value)


def momentum(value, name: str = "momentum", device: Optional[torch.device] = None) -> Scalar:
    """A float in [0, 1] or a 0-d floating tensor (read on the device: not checked by value, no sync); a CPU
    tensor given for tensors on another ``device`` comes back as its value, a float."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got bool")
    if isinstance(value, Real):
        v = float(value)
        if not (0.0 <= v <= 1.0):
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        return v
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a float or a 0-d torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point() or value.dim() != 0:
        raise ValueError(f"{name} must be a 0-d floating-point tensor, got {value.dtype} of shape {tuple(value.shape)}")
    if device is not None and value.device != device and value.device.type != "cpu":
        raise ValueError(f"{name} is on {value.device} but the tensors are on {device}")
    if device is not None and device.type != "cpu" and value.device.type == "cpu" and not torch.compiler.is_compiling():
        # A host tensor for device tensors (a schedule kept on the CPU) is read here, on the host, where no device is
        # involved: moved with .to(device) it would be a copy from pageable memory, a wait for the GPU every step.
        return float(value)
    return value


def index_vector(idx, name: str, n: int, device: torch.device, *, upper: Optional[int] = None) -> torch.Tensor:
    """An integer tensor of shape [n] (class labels, or targets in [0, upper) when ``upper`` is given)."""
    tensor(idx, name)
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (e.g. torch.long), got {idx.dtype}")
    if idx.dim() != 1 or idx.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}] (one per row), got {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"{name} is on {idx.device} but the features are on {device}")
    if upper is not None:
        index_range(idx, name, upper)
    # torch's gather and scatter take int32/int64 indices only: narrower integer types are widened here.
    return idx if idx.dtype in (torch.int32, torch.int64) else idx.long()


def index_range(idx: torch.Tensor, name: str, upper: int) -> None:
    """Every index in [0, upper) (a host read; skipped where reads are not allowed)."""
    if idx.numel() and _values_readable():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= upper:
            raise ValueError(f"{name} must lie in [0, {upper}); got values in [{lo}, {hi}]")


def tensor_list(xs, name: str) -> list:
    if isinstance(xs, torch.Tensor):
        raise TypeError(f"{name} must be an iterable of tensors (or an nn.Module), not a single tensor")
    try:
        out = list(xs)
    except TypeError:
        raise TypeError(f"{name} must be an iterable of tensors or an nn.Module, got {type(xs).__name__}") from None
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return out


# Column by column (addresses, dtypes, shapes, strides, devices), each a C-level map: ~20 % less host time than
# a tuple per tensor. The device too: a zero-size tensor has address 0 on every device.
_COLUMNS = (torch.Tensor.data_ptr, operator.attrgetter("dtype"), operator.attrgetter("shape"), torch.Tensor.stride,
            operator.attrgetter("device"))


def _columns(ts: Sequence[torch.Tensor]) -> tuple:
    return tuple(tuple(map(column, ts)) for column in _COLUMNS)


class HashedKey(tuple):
    """A tuple that hashes once: a cache key over hundreds of tensors (an EMA step's) takes ~15 µs to hash and
    as long to compare, and each cache it keys would pay both again on every call."""

    def __new__(cls, items):
        key = super().__new__(cls, items)
        key._hash = tuple.__hash__(key)
        return key

    def __hash__(self):
        return self._hash


# The signatures seen lately, each kept as one object: a repeat (every training step) is compared in full once,
# here, and then finds the caches it keys by identity.
_interned: "collections.OrderedDict[HashedKey, HashedKey]" = collections.OrderedDict()


def tensors_signature(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> tuple:
    """What validation and kernel planning of a tensor-list op depend on: (address, dtype, shape, strides,
    device) of every tensor. Addresses are unique across devices (CUDA's unified addressing), so a repeat of
    the signature is the same set of memory regions with the same layout: cached results stay valid."""
    last = _last_signature
    if last is not None and last[0] is targets and last[1] is sources:
        return last[2]
    signature = HashedKey((_columns(targets), _columns(sources)))
    seen = _interned.get(signature)
    if seen is not None:
        _interned.move_to_end(seen)
        return seen
    _interned[signature] = signature
    while len(_interned) > 64:
        _interned.popitem(last=False)
    return signature


# ema_update_ computes the signature of its lists once and the kernel planner reuses it (the same list
# objects, identified by ``is``) instead of walking 300 tensors a second time; cleared after the call.
_last_signature: Optional[tuple] = None


class remember_signature:
    def __init__(self, targets, sources, signature):
        self.entry = (targets, sources, signature)

    def __enter__(self):
        global _last_signature
        _last_signature = self.entry

    def __exit__(self, *exc):
        global _last_signature
        _last_signature = None


# Signatures of ema_update_ lists that passed ema_pairs and the one-device check (an EMA step repeats
# the same parameters every iteration; re-checking 150+ tensors costs more host time than the kernel).
_validated_ema: "collections.OrderedDict[tuple, None]" = collections.OrderedDict()


def ema_pairs_cached(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], signature: tuple,
                     names: Optional[Sequence[str]] = None) -> None:
    """ema_lists and ema_disjoint_targets, once per signature (``names``: what errors call the pairs)."""
    if signature in _validated_ema:
        _validated_ema.move_to_end(signature)
        return
    ema_lists(targets, sources, names)
    ema_disjoint_targets(targets, names, sources)
    _validated_ema[signature] = None
    while len(_validated_ema) > 64:
        _validated_ema.popitem(last=False)


def _label(side: str, i: int, names: Optional[Sequence[str]]) -> str:
    """``target[3]``, or ``target '0.weight'`` when the pairs have names (the module form)."""
    return f"{side}[{i}]" if names is None else f"{side} {names[i]!r}"


def ema_lists(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor],
              names: Optional[Sequence[str]] = None) -> None:
    """ema_pairs and one device for all (what ema_pairs_cached checks on a new signature, with the overlap check)."""
    ema_pairs(targets, sources, names)
    if targets:
        device = targets[0].device
        for i, t in enumerate(targets):
            if t.device != device:
                raise ValueError(f"{_label('target', i, names)} is on {t.device} but {_label('target', 0, names)} "
                                 f"is on {device}; ema_update_ takes one device")


def ema_pairs(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor],
              names: Optional[Sequence[str]] = None) -> None:
    if len(targets) != len(sources):
        raise ValueError(f"target has {len(targets)} tensors but source has {len(sources)}; they must pair up")
    for i, (t, s) in enumerate(zip(targets, sources)):
        tl, sl = _label("target", i, names), _label("source", i, names)
        if t.shape != s.shape:
            raise ValueError(f"{tl} has shape {tuple(t.shape)} but {sl} has {tuple(s.shape)}")
        if not t.is_floating_point() or not s.is_floating_point():
            raise TypeError(f"{tl} and {sl} must be floating-point, got {t.dtype} and {s.dtype}")
        if t.device != s.device:
            raise ValueError(f"{tl} is on {t.device} but {sl} is on {s.device}")


def _spans(tensors: Sequence[torch.Tensor]) -> list:
    """(device, first byte, end byte, index) of every non-empty tensor, sorted by device and address."""
    spans = []
    for i, t in enumerate(tensors):
        if t.numel() == 0:
            continue  # no memory
        start = t.data_ptr()
        end = start + t.element_size() * (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 1))
        spans.append((t.device, start, end, i))
    return sorted(spans, key=lambda x: (str(x[0]), x[1], x[2]))


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same elements in the same places (t = m·t + (1 − m)·t: each element read and written by one program)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def ema_disjoint_targets(targets: Sequence[torch.Tensor], names: Optional[Sequence[str]] = None,
                         sources: Optional[Sequence[torch.Tensor]] = None) -> None:
    """No two targets share memory: one fused launch would update such elements twice at once (a race on the
    GPU, while the eager paths apply both updates in turn). Nor does a target share memory with another pair's
    source, or with its own unless that is the very same view (read by one program while another writes it;
    the eager result would depend on the list's order).
    Byte ranges [first, last element] per device; views of one buffer that do not overlap are fine. Needs
    addresses: not for Dynamo's fake tensors."""
    spans = _spans(targets)
    reach = None  # (device, furthest end so far, its index)
    for device, start, end, i in spans:
        if reach is not None and reach[0] == device and start < reach[1]:
            a, b = sorted((reach[2], i))
            same = targets[a].data_ptr() == targets[b].data_ptr() and targets[a].shape == targets[b].shape
            what = "are the same tensor" if same else "overlap in memory"
            raise ValueError(f"{_label('target', a, names)} and {_label('target', b, names)} {what}; one ema_update_ "
                             "call must not update an element twice (list a tied tensor once, or pass momentum**k "
                             "for k updates)")
        if reach is None or reach[0] != device or end > reach[1]:
            reach = (device, end, i)
    if sources is None:
        return
    # Targets are disjoint now: sorted by start, they are sorted by end too, and the ones a source range meets
    # are consecutive.
    keys = [(str(d), st) for d, st, _, _ in spans]
    for device, start, end, j in _spans(sources):
        k = bisect.bisect_right(keys, (str(device), start)) - 1
        k = max(k, 0)
        while k < len(spans) and (str(spans[k][0]), spans[k][1]) < (str(device), end):
            t_dev, t_start, t_end, i = spans[k]
            if t_dev == device and t_start < end and start < t_end and not (i == j and _same_view(targets[i],
                                                                                                sources[j])):
                what = "another pair reads" if i != j else "its own source overlaps without being it"
                raise ValueError(f"{_label('target', i, names)} shares memory with {_label('source', j, names)}; one "
                                 f"ema_update_ call cannot write a tensor that {what}")
            k += 1
