"""DINO's two Triton paths side by side at the paper size: the two-pass kernels (ops/dino.py) and the gradient
formed in the forward (ops/dino_fused.py) over a grid of its launch settings, each step's time as a multiple
of the memory-traffic floor (read student and teacher once, write the gradient once) at the copy bandwidth
measured in the same run. The winner's settings go into ops/dino_fused.py; benchmarks/NOTES.md has the
prediction.

    PYTHONPATH=. python benchmarks/dino_variants.py --out DIR [--dtype fp32 bf16] [--B 64] [--P 65536]
        [--programs 66 132 264 528] [--blocks 4096 2048 8192] [--stages 1 3] [--crops 1 2]
        [--budget SECONDS]

On CPU (the interpreter) it runs a tiny size once, as a smoke test of the script.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch

import sslkernels
from sslkernels.bench.memory import peak_cuda
from sslkernels.bench.roofline import copy_gbps
from sslkernels.bench.timing import DEFAULT, QUICK, measure

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items() if v is not None})
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _time_ms(fn, device) -> float:
    # The bench's timing (do_bench medians on a GPU, flushing L2 between calls); a short budget on CPU,
    # where this only checks that the script runs.
    return measure(fn, device, DEFAULT if device.type == "cuda" else QUICK).median_ms


def variants(programs, blocks, stages, crops):
    """The two-pass path, the fused one as it launches by default, then the fused one over the grid of
    launch settings, most informative first (the budget may cut the tail): every program count at the
    first block, stage count and crop count, then one setting changed at a time (crops, stages, block),
    then two, then three."""
    yield "two-pass", dict(SSLKERNELS_DINO_FUSED="0")
    yield "fused (default launch)", dict(SSLKERNELS_DINO_FUSED="1")
    grid = [(c, st, b, p) for b in blocks for st in stages for c in crops for p in programs]

    def changed(v):  # how many of (crops, stages, block) differ from the first of each
        return sum(x != first for x, first in zip(v[:3], (crops[0], stages[0], blocks[0])))

    for c, st, b, p in sorted(grid, key=changed):  # stable: the loops' order within each rank
        yield f"fused programs={p} block={b} stages={st} crops={c}", dict(
            SSLKERNELS_DINO_FUSED="1", SSLKERNELS_DINO_FUSED_PROGRAMS=p, SSLKERNELS_DINO_FUSED_BLOCK=b,
            SSLKERNELS_DINO_FUSED_STAGES=st, SSLKERNELS_DINO_FUSED_CROPS=c)


def run(args) -> list:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    G, S = 2, 12
    B, P = (args.B, args.P) if device.type == "cuda" else (3, 300)
    # Read + write bandwidth on a buffer far larger than L2, as the bench's targets measure it.
    bw = copy_gbps(1 << 30, device, DEFAULT) if device.type == "cuda" else float("nan")
    rows = []
    for name in args.dtype:
        deadline = time.monotonic() + args.budget / len(args.dtype)
        dtype = DTYPES[name]
        gen = torch.Generator(device=device).manual_seed(0)
        student = torch.randn(S * B, P, device=device, generator=gen).to(dtype).requires_grad_()
        teacher = torch.randn(G * B, P, device=device, generator=gen).to(dtype)
        center = torch.randn(1, P, device=device, generator=gen) * 0.1
        floor_bytes = (student.numel() + teacher.numel() + student.numel()) * student.element_size()
        floor_ms = floor_bytes / bw / 1e6 if bw == bw else float("nan")
        reference = None
        for label, env in variants(args.programs, args.blocks, args.stages, args.crops):
            if time.monotonic() > deadline and reference is not None:
                print(f"{name:5} its share of the {args.budget:.0f} s budget is spent: the other variants are not run",
                      flush=True)
                break
            with _env(**env):
                def step():
                    loss = sslkernels.dino_loss(student, teacher, center, n_global_crops=G, backend="triton")
                    return loss, torch.autograd.grad(loss, student)[0]

                loss, grad = step()  # compile, and the values for the agreement check
                ms = _time_ms(step, device)
                # One step on its own, after the timing: do_bench's 256 MB L2-flush buffer is not the step's memory.
                extra = ((peak_cuda(step) - student.numel() * student.element_size()) / 2**20
                         if device.type == "cuda" else float("nan"))
            if reference is None:
                reference = (loss.detach(), grad)
            row = dict(dtype=name, variant=label, B=B, P=P, ms=ms, floor_ms=floor_ms, floor_ratio=ms / floor_ms,
                       extra_MiB=extra, copy_GBps=bw,
                       # Agreement with the first variant (the two-pass kernels), relative to its largest value.
                       loss_diff=float((loss.detach() - reference[0]).abs() / reference[0].abs()),
                       grad_diff=float((grad.float() - reference[1].float()).abs().max()
                                       / reference[1].float().abs().max()))
            rows.append(row)
            print(f"{name:5} {label:34} {ms:8.3f} ms  {row['floor_ratio']:5.2f}× floor  extra {extra:8.1f} MiB  "
                  f"rel. Δloss {row['loss_diff']:.1e}  Δgrad {row['grad_diff']:.1e}", flush=True)
        student = teacher = center = reference = None  # free this dtype's inputs before the next
    return rows


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--P", type=int, default=65536)
    ap.add_argument("--programs", type=int, nargs="*", default=[66, 132, 264, 528])
    ap.add_argument("--blocks", type=int, nargs="*", default=[4096, 2048, 8192])
    ap.add_argument("--stages", type=int, nargs="*", default=[1, 3])
    ap.add_argument("--crops", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--budget", type=float, default=120.0,
                    help="seconds in all, shared by the dtypes: variants past a dtype's share are skipped")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    rows = run(args)
    for line in verdicts(rows):
        print(line, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "dino_variants.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0


# Issue 5 / 10: DINO fwd+bwd at most this multiple of its memory-traffic floor.
TARGET_FLOOR_RATIO = 1.5


def verdicts(rows):
    """Per dtype: the two-pass step, the fastest fused variant, and what to do with it (NOTES' decision rule:
    make the fused path the default, with the winner's settings, if it beats the two-pass step; the target
    needs it at ≤ 1.5× the floor)."""
    out = []
    for name in dict.fromkeys(r["dtype"] for r in rows):
        mine = [r for r in rows if r["dtype"] == name]
        two = next((r for r in mine if r["variant"] == "two-pass"), None)
        fused = min((r for r in mine if r["variant"].startswith("fused")), key=lambda r: r["ms"], default=None)
        if two is None or fused is None:
            out.append(f"{name}: nothing to compare (the budget ran out)")
            continue
        gain = two["ms"] / fused["ms"]
        target = "meets" if fused["floor_ratio"] <= TARGET_FLOOR_RATIO else "misses"
        act = ("make it the default with these settings" if gain > 1.0 else "keep the two-pass default")
        out.append(f"{name}: two-pass {two['ms']:.3f} ms ({two['floor_ratio']:.2f}× floor); best {fused['variant']} "
                   f"{fused['ms']:.3f} ms ({fused['floor_ratio']:.2f}× floor, {gain:.2f}× the two-pass speed): "
                   f"{target} the ≤ {TARGET_FLOOR_RATIO}× target; {act}")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
