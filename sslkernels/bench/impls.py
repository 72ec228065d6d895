"""Which implementations a case runs, discovered at run time, and the callables that time them.

Groups (``--impl``):
  ours     what ``backend="auto"`` picks on the device ("ours"), and every other fused kind the op has
           registered ("ours:triton", "ours:cuda", "ours:cpu"), skipped with a reason where it cannot run
  eager    the eager reference (``backend="torch"``)
  compile  ``torch.compile`` of the eager reference
  baselines  what users write without a library (baselines.py: foreach lerp, a per-parameter loop)
  peers    other libraries (peers.py), when importable

Kernels register themselves with sslkernels.backends, so new ones (more Triton kernels, the CUDA
extension) show up here without edits.

``ours:graph`` (CUDA, only when named: ``--impl ours:graph``, or a target that reads it) is ours' step
captured once in a CUDA graph and replayed: the time of the kernels alone, with none of the host work
(argument checks, launches, autograd) that a small batch's eager step is made of.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, List, Optional, Sequence

import torch

from .. import backends
from .baselines import baselines_for
from .cases import Inputs, OpSpec, Size
from .peers import Unsupported, peers_for

GROUPS = ("ours", "eager", "compile", "baselines", "peers")
FUSED_KINDS = ("triton", "cuda", "cpu")
GRAPH = "ours:graph"
AUTO_IS_EAGER = "no fused {device} implementation (backend='auto' runs the eager reference)"


@dataclass
class Impl:
    name: str                  # "ours", "ours:cuda", "eager", "compile", a baseline's or a peer's name
    group: str                 # one of GROUPS
    kind: str                  # the backend kind, "inductor", or the peer's package
    make: Optional[Callable[[Inputs, Size, torch.device], Callable[[], Any]]] = None
    skip: Optional[str] = None  # why it does not run (then make is None)
    note: str = ""
    module: str = ""            # peers: the top-level import name
    graph: bool = False         # ours:graph: its callables replay CUDA graphs of the steps


def _why_not(kind: str, device: torch.device) -> Optional[str]:
    """Why the fused ``kind`` cannot be timed on ``device`` (None: it can)."""
    if kind == "triton":
        if not backends.triton_available():
            return "Triton is not installed"
        if device.type != "cuda":
            # Under TRITON_INTERPRET=1 it would run, but the interpreter is no measure of speed.
            return "interpreter"
        return None
    if kind == "cuda":
        if device.type != "cuda":
            return "needs CUDA tensors"
        return None if backends.cuda_extension() is not None else "sslkernels._C was not built"
    if kind == "cpu":
        return None if device.type == "cpu" else "CPU path (CPU tensors only)"
    return None


def _registered(fn: Callable) -> Callable[[Inputs, Size, torch.device], Callable[[], Any]]:
    return lambda inp, size, device: partial(fn, *inp.args)


def _quiet_compile() -> None:
    # Graph-break reports (rankme's float()) and inductor deprecation warnings would drown the table.
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\._inductor.*")


def _compiled(fn: Callable) -> Callable[[Inputs, Size, torch.device], Callable[[], Any]]:
    def make(inp, size, device):
        _quiet_compile()
        # A fresh compile per case: dynamo would otherwise hit its recompile limit across sizes and
        # silently fall back to eager.
        torch._dynamo.reset()
        return partial(torch.compile(fn, dynamic=False), *inp.args)
    return make


class Exactly(list):
    """Implementation names to run as named, never as groups: the targets' "ours" without the other fused
    kinds (ours:cuda, ...) that the group "ours" brings in."""


def _selected(group: str, name: str, wanted: Sequence[str]) -> bool:
    return name in wanted or (group in wanted and not isinstance(wanted, Exactly))


def discover(spec: OpSpec, device: torch.device, wanted: Sequence[str]) -> List[Impl]:
    """The implementations of ``spec`` named by ``wanted`` (groups or implementation names)."""
    registry = backends.available(spec.registry)
    auto = backends.resolve(spec.registry, "auto", device)
    out: List[Impl] = []
    if _selected("ours", "ours", wanted):
        if auto == "torch":
            out.append(Impl("ours", "ours", "torch", skip=AUTO_IS_EAGER.format(device=device.type)))
        else:
            out.append(Impl("ours", "ours", auto, _registered(registry[auto])))
    for kind in FUSED_KINDS:
        name = f"ours:{kind}"
        if kind not in registry or kind == auto or not _selected("ours", name, wanted):
            continue
        why = _why_not(kind, device)
        out.append(Impl(name, "ours", kind, None if why else _registered(registry[kind]), skip=why))
    if GRAPH in wanted:  # by name only: it measures something else than a step as users run it
        why = ("CUDA graphs need CUDA tensors" if device.type != "cuda" else
               AUTO_IS_EAGER.format(device=device.type) if auto == "torch" else None)
        out.append(Impl(GRAPH, "ours", "graph", None if why else _registered(registry[auto]), skip=why, graph=True,
                        note="ours' step captured once in a CUDA graph and replayed: kernels without host work"))
    if _selected("eager", "eager", wanted):
        out.append(Impl("eager", "eager", "torch", _registered(registry["torch"])))
    if _selected("compile", "compile", wanted):
        out.append(Impl("compile", "compile", "inductor", _compiled(registry["torch"])))
    for base in baselines_for(spec.name):
        if _selected("baselines", base.name, wanted):
            out.append(Impl(base.name, "baselines", "torch", base.make, note=base.note))
    for peer in peers_for(spec.name):
        if not _selected("peers", peer.name, wanted):
            continue
        if peer.cuda_only and device.type != "cuda":
            out.append(Impl(peer.name, "peers", peer.package, skip="needs CUDA", note=peer.note, module=peer.module))
        else:
            out.append(Impl(peer.name, "peers", peer.package, peer.make, note=peer.note, module=peer.module))
    return out


# -------------------------------------------------------------------------------------- callables


def first_tensor(out: Any) -> Optional[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


@dataclass
class Callables:
    """What one implementation of one case runs: ``fwd`` always; ``fwd_bwd`` and ``make_bwd`` when differentiable.

    ``make_bwd()`` runs one forward and returns a callable that repeats only its backward
    (retain_graph), so the backward is timed on its own.
    """
    fwd: Callable[[], Any]
    fwd_bwd: Optional[Callable[[], None]] = None
    make_bwd: Optional[Callable[[], Callable[[], None]]] = None
    output: Any = None  # the output of the first call (for the sanity check against eager)
    reset: Callable[[], None] = lambda: None  # drops the inputs' gradients (before a memory baseline)
    memory_note: str = ""  # why the peak memory of a call is not measured (empty: it is)

    def for_mode(self, mode: str) -> Callable[[], Any]:
        if mode == "fwd":
            return self.fwd
        if mode == "fwd+bwd":
            return self.fwd_bwd
        return self.make_bwd()


class NoGradient(Exception):
    """The implementation's output does not carry a gradient (a peer with a different contract)."""


def build_callables(spec: OpSpec, inputs: Inputs, size: Size, impl: Impl, device: torch.device,
                    capture: Optional[Callable[[Callable[[], Any]], Callable[[], Any]]] = None) -> Callables:
    """The "setup" of one implementation on one case's inputs: builds and runs it once.

    The first call does one-time work (compilation, autotuning, lazy allocation) so it is never timed.
    ``capture`` (ours:graph; default cuda_graph): turns a step into a callable replaying it.
    """
    call = impl.make(inputs, size, device)
    leaves = inputs.leaves
    out = call()
    if impl.graph:
        return _graph_callables(spec, call, leaves, out, capture or cuda_graph)
    if not spec.grad:
        return Callables(fwd=call, output=out)
    g = _upstream(out)

    def clear():
        for x in leaves:
            x.grad = None

    def backward(o, retain: bool):
        first_tensor(o).backward(g, retain_graph=retain)

    def fwd_bwd():
        clear()
        backward(call(), False)

    def make_bwd():
        clear()
        o = call()

        def bwd():
            clear()
            backward(o, True)
        return bwd

    clear()
    backward(out, False)  # warm the backward too
    clear()
    return Callables(fwd=call, fwd_bwd=fwd_bwd, make_bwd=make_bwd, output=out, reset=clear)


def _upstream(out: Any) -> Optional[torch.Tensor]:
    """The upstream gradient: None (1) for scalar losses, random (never zeros) for matrix outputs."""
    t = first_tensor(out)
    if t is None or not t.requires_grad:
        raise NoGradient("its output has no gradient")
    if t.dim() == 0:
        return None
    gen = torch.Generator(device=t.device)
    gen.manual_seed(0)
    return torch.randn(t.shape, generator=gen, device=t.device, dtype=torch.float32).to(t.dtype)


def cuda_graph(step: Callable[[], Any]) -> Callable[[], Any]:
    """``step`` captured once in a CUDA graph; returns the replay. Warm-up runs on a side stream first, as
    capture requires (lazy allocations and autotuning happen there, not in the graph)."""
    current = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay  # the bound method keeps the graph (and its memory pool) alive


def _graph_callables(spec: OpSpec, call: Callable[[], Any], leaves: List[torch.Tensor], out: Any,
                     capture: Callable[[Callable[[], Any]], Callable[[], Any]]) -> Callables:
    """ours:graph: the forward, and forward + backward (the gradients of every leaf, as torch.autograd.grad
    returns them), each replayed from one capture. The backward alone is derived, (fwd+bwd) − fwd: a graph
    replays whole steps. Peak memory is not measured: the graph's pool is allocated at capture."""
    note = "not measured: a CUDA graph allocates its memory pool once, at capture"
    fwd = capture(call)
    if not spec.grad:
        return Callables(fwd=fwd, output=out, memory_note=note)
    g = _upstream(out)

    def step():
        torch.autograd.grad(first_tensor(call()), leaves, g, allow_unused=True)

    def no_bwd():
        raise NotImplementedError("a CUDA graph replays whole steps")
    return Callables(fwd=fwd, fwd_bwd=capture(step), make_bwd=no_bwd, output=out, memory_note=note)


def is_oom(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None) or getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(err, oom_type):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def describe_error(err: BaseException, limit: int = 160) -> str:
    if isinstance(err, (Unsupported, NoGradient)):
        return str(err)[:limit]
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}"[:limit]
