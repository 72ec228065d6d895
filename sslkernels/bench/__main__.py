"""The benchmark CLI: ``python -m sslkernels.bench [OPS...] [--sizes ...] [--dtype ...] [--impl ...]
[--device cpu|cuda] [--out DIR] [--quick]`` (``--help`` for the rest); ``--distributed [--worlds 1,2,3]``:
per-rank memory and time of the losses across ranks (distributed.py)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from . import distributed, merge, report, targets
from .cases import DTYPES, PRESETS, SPECS, default_preset, resolve_op
from .env import default_out_dir, device_name
from .impls import FUSED_KINDS, GRAPH, GROUPS, discover
from .peers import PEERS
from .baselines import BASELINES
from .run import TARGETS, Config, _parse_override, run, sizes_for
from .timing import DEFAULT, QUICK


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sslkernels.bench",
        description="Benchmark sslkernels' ops against the eager reference, torch.compile and other libraries.",
        epilog="Examples: --quick (every op, small sizes, < 5 min on a laptop CPU); "
               "--sizes targets (exactly the cases of the issues' targets on this device, with pass/fail); "
               "clip_loss --sizes clip-b,clip-l --dtype bf16; info_nce --sweep N --impl ours,eager; "
               "--list (ops, sizes, formulas, implementations on this device); "
               "--distributed (per-rank memory and time of the losses across 1, 2, 3 gloo processes).")
    p.add_argument("ops", nargs="*", help=f"ops to run (default: all): {', '.join(SPECS)}")
    p.add_argument("--sizes", default=None,
                   help=f"comma list of presets ({', '.join(PRESETS)}, {TARGETS}), size labels (e.g. simclr,clip-b), "
                        "or dim overrides like N=8192:D=256 (default: paper on CUDA, small on CPU, quick with --quick). "
                        f"'{TARGETS}': the cases of the issues' targets for this device, each in its own dtype "
                        "and modes, and only the implementations they compare")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--impl", default=None,
                   help=f"comma list of groups ({', '.join(GROUPS)}) and/or implementation names "
                        "(ours:cuda, foreach_lerp, open_clip, ...; ours:graph, CUDA only and only by name: ours' step "
                        "replayed from a CUDA graph); default: all, except compile with --quick on CPU "
                        "(inductor takes 5-45 s per case on a CPU, most of a quick run; --impl all brings it back)")
    p.add_argument("--modes", default=None, help="comma list of fwd, bwd, fwd+bwd (default: every mode of each op)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads; the memory worker uses the same). On a busy "
                        "machine 1 thread gives far steadier times: idle OpenMP workers wait on descheduled ones")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is shown only on a terminal)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results/<device>/<timestamp>)")
    p.add_argument("--quick", action="store_true", help="small sizes and short timing budgets")
    p.add_argument("--sweep", default=None, metavar="DIM",
                   help="scaling sweep: DIM (e.g. N) from --sweep-start doubling until out of memory, "
                        "--sweep-max, or a call slower than --sweep-limit-s")
    p.add_argument("--sweep-start", type=int, default=1024)
    p.add_argument("--sweep-max", type=int, default=None, help="default: 2^20 on CUDA, 2^14 on CPU")
    p.add_argument("--sweep-limit-s", type=float, default=None, help="default: 2 s (0.5 s with --quick)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--list", action="store_true", help="list ops, sizes, formulas and implementations, then exit")
    d = p.add_argument_group(
        "distributed (--distributed)",
        "Per-rank peak memory and time of fwd+bwd of clip_loss, siglip_loss, nt_xent and supcon_loss at a fixed "
        "local batch, for each world size: ours with distributed='ring' and with gather_distributed=True, "
        "OpenCLIP's ClipLoss(local_loss=True, gather_with_grad=True) / SigLipLoss(dist_impl='bidir'), and an eager "
        "all-gather CLIP loss. CPU: WORLD real gloo processes per world size (file rendezvous, --threads each); "
        "CUDA: NCCL, one process per visible GPU (larger worlds are skipped). Of the flags above it reads OPS "
        "(default: all four), --sizes N=..:D=.. (N feature rows per rank; nt_xent gets N/2 pairs; default "
        f"N={distributed.CPU_DIMS['N']}:D={distributed.CPU_DIMS['D']} on CPU, about 3 min on 2 cores for worlds "
        "1,2,3 (lighter than N=4096:D=512, which takes about 20 min there); "
        f"N={distributed.CUDA_DIMS['N']}:D={distributed.CUDA_DIMS['D']} on CUDA; --quick: "
        f"N={distributed.QUICK_DIMS['N']}:D={distributed.QUICK_DIMS['D']}), --dtype, --impl (ours, "
        f"{', '.join(n.replace(' ', '-') for n in distributed.impl_names())}), --threads (per rank, default 1), --device, --out, --quick, "
        "--no-progress. Writes results.json, table.txt, results.md and memory.png.")
    d.add_argument("--distributed", action="store_true",
                   help="run the distributed benchmark instead of the per-op one (see this group's description)")
    d.add_argument("--worlds", default="1,2,3",
                   help="comma list of world sizes (number of ranks), default 1,2,3; the growth column compares "
                        "the largest with the smallest (world 1: the single-process loss)")
    d.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per case, each after a barrier (default "
                        f"{distributed.REPEATS['cpu']} on CPU, {distributed.REPEATS['cuda']} on CUDA, "
                        f"{distributed.QUICK_REPEATS} with --quick)")
    d.add_argument("--timeout-s", type=float, default=distributed.IDLE_TIMEOUT_S,
                   help="stop a world whose ranks finish no case for this long (also the process group's "
                        "collective timeout); its cases left are recorded as errors (default %(default)g)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no case after this many seconds of the run; the cases left are recorded as pending "
                        "(results.json is rewritten after every case, so a run killed from outside keeps what it "
                        "measured too). Continue with the same command and --resume")
    p.add_argument("--resume", default=None, metavar="RESULTS_JSON",
                   help="an earlier run of the same command on this device: its measured cases are not run again, "
                        "and --out gets both runs merged (every record keeps its own run's roofline and ratios)")
    p.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                   help="one report from several runs on the same device (a preset run in parts): merged "
                        "results.json, tables, Markdown and plots in --out (required)")
    p.add_argument("--report", default=None, metavar="RESULTS_JSON",
                   help="re-print the table of a results.json (with --out: rewrite its tables, Markdown and plots there)")
    return p


def _list(device: torch.device) -> str:
    lines = [f"implementations on {device} (from sslkernels.backends; whether peers are installed is checked at run time):"]
    for spec in SPECS.values():
        impls = discover(spec, device, list(GROUPS))
        lines.append(f"\n{spec.name}  ({'differentiable' if spec.grad else 'no gradient'})")
        lines.append(f"  work: {spec.formula}")
        for preset, sizes in spec.sizes.items():
            lines.append(f"  {preset:<6} " + "; ".join(f"{s.label} [{s.describe()}]" for s in sizes))
        tsizes = [f"{c[1].label} [{c[1].describe()}] {c[2]}" for c in targets.cases(device.type, [spec.name])]
        if tsizes:
            lines.append(f"  {TARGETS:<6} " + "; ".join(tsizes))
        lines.append("  impls: " + ", ".join(f"{i.name}" + (f" (skip: {i.skip})" if i.skip else "") for i in impls))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.merge:
        if not args.out:
            print("--merge needs --out DIR for the merged report", file=sys.stderr)
            return 2
        try:
            doc = merge.load_and_merge(args.merge)
        except ValueError as err:
            print(err, file=sys.stderr)
            return 2
        written = report.write_all(doc, Path(args.out))
        _note_files(written)
        sys.stdout.write(written["text"])
        return 0
    if args.report:
        doc = json.loads(Path(args.report).read_text())
        reporter = distributed if doc.get("benchmark") == "distributed" else report
        if args.out:  # regenerate every file (tables, Markdown, plots) from the results alone
            _note_files(reporter.write_all(doc, Path(args.out)))
        sys.stdout.write(reporter.text_report(doc))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.distributed:
        return _distributed(args, device)
    if args.list:
        print(_list(device))
        return 0
    try:
        cfg, out_dir = prepare(args, device)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    doc = run(cfg)
    return _print_written(report.write_all(doc, out_dir), t0)


def prepare(args: argparse.Namespace, device: torch.device) -> Tuple[Config, Path]:
    """The per-op run's Config and output folder from the parsed flags, or ValueError naming what is wrong; runs
    nothing (tests/test_gpu_scripts.py holds the GPU scripts' command lines to it without a GPU)."""
    ops = [resolve_op(o).name for o in args.ops]
    wanted = [s.strip() for s in args.impl.split(",") if s.strip()] if args.impl else None
    left_out = {}
    if wanted is None and args.quick and device.type == "cpu":
        # On a GPU inductor compiles a quick case in seconds and compile stays in (main's GPU quick run has it).
        wanted = [g for g in GROUPS if g != "compile"]
        left_out["compile"] = ("left out of --quick: inductor compiles each case for 5-45 s on a CPU "
                               "(--impl all brings it back)")
    if wanted and "all" in wanted:
        wanted = list(dict.fromkeys([g for w in wanted for g in (GROUPS if w == "all" else (w,))]))
    known = ({"all", GRAPH} | set(GROUPS) | {f"ours:{k}" for k in FUSED_KINDS} | {p.name for ps in PEERS.values() for p in ps}
             | {b.name for bs in BASELINES.values() for b in bs})
    unknown = [w for w in wanted or () if w not in known]
    if unknown:
        raise ValueError(f"--impl: unknown {unknown}; choose from {sorted(known)}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()] if args.modes else None
    if modes and any(m not in ("fwd", "bwd", "fwd+bwd") for m in modes):
        raise ValueError(f"--modes: choose from fwd, bwd, fwd+bwd; got {modes}")
    if args.time_budget is not None and not args.time_budget > 0:
        raise ValueError(f"--time-budget is a number of seconds above 0; got {args.time_budget}")
    sizes = args.sizes.split(",") if args.sizes else ["quick" if args.quick else default_preset(device)]
    sizes = [s.strip() for s in sizes if s.strip()]
    # A size that names nothing would leave its ops out after the roofline was measured: a typo costs a GPU call.
    specs = [SPECS[o] for o in ops] or list(SPECS.values())
    for item in sizes:
        if item != TARGETS and not any(sizes_for(spec, [item], device) for spec in specs):
            raise ValueError(f"--sizes: {item!r} is no preset ({', '.join(PRESETS)}, {TARGETS}), size label or dims "
                             f"(N=..:D=..) of {', '.join(ops) or 'any op'}")
    if args.sweep and not any(args.sweep in spec.sizes[default_preset(device)][0].dims for spec in specs):
        raise ValueError(f"--sweep: no op of {', '.join(ops) or 'all'} has a dim {args.sweep!r}")
    resume = None
    if args.resume:
        try:
            resume = _resumable(args.resume, device)
        except (OSError, ValueError) as err:
            raise ValueError(f"--resume {args.resume}: {err}") from err
    cfg = Config(ops=ops, sizes=sizes, dtype=DTYPES[args.dtype],
                 impls=wanted, device=device, quick=args.quick,
                 sweep=args.sweep, sweep_start=args.sweep_start, sweep_max=args.sweep_max,
                 sweep_limit_s=args.sweep_limit_s, memory=not args.no_memory, budget=QUICK if args.quick else DEFAULT,
                 modes=modes, threads=args.threads, progress=False if args.no_progress else None,
                 left_out=left_out)
    out_dir = Path(args.out) if args.out else default_out_dir(device)
    cfg.time_budget_s, cfg.checkpoint = args.time_budget, out_dir / "results.json"
    cfg.resume, cfg.resume_name = resume, args.resume or ""
    return cfg, out_dir


def _resumable(path: str, device: torch.device) -> dict:
    """An earlier per-op run's results.json, measured on a device like this one (else ratios would mix devices)."""
    doc = json.loads(Path(path).read_text())
    if doc.get("benchmark") == "distributed" or "results" not in doc:
        raise ValueError("not the results.json of a per-op run")
    theirs, ours = doc["environment"]["device_name"], device_name(device)
    if theirs != ours or doc["config"]["device"].split(":")[0] != device.type:
        raise ValueError(f"measured on {theirs!r} ({doc['config']['device']}), not on this {ours!r} ({device.type})")
    return doc


def _note_files(written: dict) -> None:
    """What --merge / --report wrote, and why there are no plots if there are none (on stderr: stdout is the table)."""
    if written["plots_note"]:
        print(written["plots_note"], file=sys.stderr)
    print(f"wrote {', '.join(str(f) for f in written['files'])}", file=sys.stderr)


def _print_written(written: dict, t0: float) -> int:
    """The table, what was written where, and the wall time: the end of every run."""
    sys.stdout.write(written["text"])
    if written["plots_note"]:
        print(written["plots_note"])
    print(f"wrote {', '.join(str(f) for f in written['files'])}")
    print(f"total wall time {time.perf_counter() - t0:.1f} s")
    return 0


def _distributed(args: argparse.Namespace, device: torch.device) -> int:
    not_here = [flag for flag, on in (("--sweep", args.sweep), ("--modes", args.modes), ("--list", args.list),
                                      ("--no-memory", args.no_memory)) if on]
    if not_here:
        print(f"--distributed does not take {', '.join(not_here)}", file=sys.stderr)
        return 2
    try:
        ops = [resolve_op(o).name for o in args.ops] or list(distributed.OPS)
        other = [o for o in ops if o not in distributed.OPS]
        if other:
            raise ValueError(f"--distributed measures {', '.join(distributed.OPS)}; not {', '.join(other)}")
        worlds = distributed.parse_worlds(args.worlds)
        dims = distributed.default_dims(device, args.quick)
        for item in (args.sizes.split(",") if args.sizes else []):
            if item.strip():
                dims.update(_parse_override(item.strip()))
        if set(dims) - {"N", "D", "C"}:
            raise ValueError(f"--sizes with --distributed sets N, D (and C, supcon's classes); got {sorted(dims)}")
        wanted = [s.strip() for s in args.impl.split(",") if s.strip()] if args.impl else None
        distributed.select(ops, wanted)  # unknown names are an error before anything starts
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    if (args.repeats is not None and args.repeats < 1) or args.timeout_s <= 0:
        print(f"--repeats is at least 1 and --timeout-s above 0; got {args.repeats}, {args.timeout_s}", file=sys.stderr)
        return 2
    repeats = args.repeats or distributed.default_repeats(device, args.quick)
    cfg = distributed.DistConfig(ops=ops, worlds=worlds, dims=dims, dtype=DTYPES[args.dtype], device=device,
                                 impls=wanted, repeats=repeats, threads=args.threads or 1, quick=args.quick,
                                 progress=False if args.no_progress else None, idle_timeout_s=args.timeout_s)
    t0 = time.perf_counter()
    doc = distributed.run(cfg)
    stamped = default_out_dir(device)
    out_dir = Path(args.out) if args.out else stamped.with_name(stamped.name + "-distributed")
    return _print_written(distributed.write_all(doc, out_dir), t0)


if __name__ == "__main__":
    sys.exit(main())
