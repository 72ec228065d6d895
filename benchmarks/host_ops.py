"""Host work per training step of the fused losses: torch ops dispatched and Triton kernels launched.

A small batch's step is host-bound on a GPU (MoCo v2's 256 queries: ~50 µs of kernels, hundreds of µs of
Python, torch ops and launches), so this counts what the host issues for one forward + backward, with the
Triton kernels replaced by counters: no GPU and no interpreter time needed, and the numbers are exact, so
a change that adds or removes a launch shows here on any machine. Each non-view torch op is about one CUDA
kernel launch (~5 µs of host time); each Triton launch ~10–25 µs (argument binding in Python). Also reports
the host time per step with the kernels stubbed (noisy on a shared CPU: take the min of repeats).

    PYTHONPATH=. python benchmarks/host_ops.py [--ops moco_loss,clip_loss] [--detail]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Callable, Dict

os.environ.setdefault("TRITON_INTERPRET", "1")  # lets backend="triton" take CPU tensors; no kernel runs

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sslkernels  # noqa: E402
from sslkernels.ops import _common, contrastive  # noqa: E402

_VIEWS = {"view", "reshape", "_reshape_alias", "slice", "select", "expand", "t", "transpose", "unsqueeze",
          "squeeze", "alias", "detach", "as_strided", "_unsafe_view", "empty", "empty_strided"}


class _Launches:
    """Stands in for a @triton.jit kernel: ``kernel[grid](...)`` counts instead of running."""

    def __init__(self, counter: Dict[str, int]):
        self.counter = counter

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counter["launches"] += 1
        return launch


@contextlib.contextmanager
def stubbed_kernels(counter: Dict[str, int], split_programs: int = 132):
    """Every ``*_kernel`` of ops/contrastive.py counts its launches; outputs are plain empty tensors, and key
    splits are sized for an H100's 132 SMs (as on the GPU). Restores everything on exit."""
    saved = {n: getattr(contrastive, n) for n in dir(contrastive) if n.endswith("_kernel")}
    saved_split, saved_poison = contrastive._SPLIT_PROGRAMS, _common.poison_outputs
    try:
        for n in saved:
            setattr(contrastive, n, _Launches(counter))
        contrastive._SPLIT_PROGRAMS = split_programs
        _common.poison_outputs = lambda: False
        yield
    finally:
        for n, k in saved.items():
            setattr(contrastive, n, k)
        contrastive._SPLIT_PROGRAMS, _common.poison_outputs = saved_split, saved_poison


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in _VIEWS:
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _steps(n: int = 256, d: int = 128, k: int = 4096) -> Dict[str, Callable[[], None]]:
    g = torch.Generator().manual_seed(0)

    def unit(rows, grad=True):
        x = torch.nn.functional.normalize(torch.randn(rows, d, generator=g), dim=1)
        return x.requires_grad_(grad)

    q, a, z2, key, queue = unit(n), unit(n), unit(n), unit(n, False), unit(k, False)
    labels = torch.randint(0, 10, (n,), generator=g)
    t = "triton"
    return {
        "moco_loss": lambda: sslkernels.moco_loss(q, key, queue, backend=t).backward(),
        "info_nce": lambda: sslkernels.info_nce(q, a, backend=t).backward(),
        "clip_loss": lambda: sslkernels.clip_loss(q, a, 14.3, backend=t).backward(),
        "nt_xent": lambda: sslkernels.nt_xent(q, z2, backend=t).backward(),
        "supcon_loss": lambda: sslkernels.supcon_loss(q, labels, backend=t).backward(),
        "siglip_loss": lambda: sslkernels.siglip_loss(q, a, 10.0, -10.0, backend=t).backward(),
    }


def count(op: str, step: Callable[[], None], repeats: int = 15) -> dict:
    counter = {"launches": 0}
    with stubbed_kernels(counter):
        step()  # first call: one-time work (dispatch caches)
        counter["launches"] = 0
        with _CountOps() as c:
            step()
        launches = counter["launches"]
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(20):
                step()
            best = min(best, (time.perf_counter() - t0) / 20)
    return {"op": op, "torch_ops": sum(c.ops.values()), "triton_launches": launches, "host_us": best * 1e6,
            "ops": dict(sorted(c.ops.items()))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=None, help="comma list (default: every contrastive loss)")
    p.add_argument("--detail", action="store_true", help="list the torch ops by name")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    steps = _steps()
    wanted = args.ops.split(",") if args.ops else list(steps)
    print(f"{'op':12s} {'torch ops':>9s} {'triton launches':>15s} {'host us (stubbed)':>18s}")
    for op in wanted:
        r = count(op, steps[op])
        print(f"{op:12s} {r['torch_ops']:9d} {r['triton_launches']:15d} {r['host_us']:18.0f}")
        if args.detail:
            print("    " + " ".join(f"{k}:{v}" for k, v in r["ops"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
