"""Run a benchmark: every (case, implementation, mode), side by side in one process.

Per case the inputs are built once (seeded) and every implementation runs on them; the eager
reference goes first so the others are checked against its output before they are timed. Results
are flat records (one per case × implementation × mode); report.py turns them into files and tables.

A run can be cut into pieces (a lent GPU runs one command for at most 10 minutes): with a time budget no
case starts once it is spent and the cases left are recorded as pending; with a checkpoint path the
results.json is rewritten after every case (the cases not reached yet pending too), so a run killed
from outside keeps what it measured; and a resumed run measures only the cases an earlier results.json
lacks, then merges the two (merge.py: each record keeps the roofline and ratios of the run that measured it).
"""
from __future__ import annotations

import gc
import importlib.util
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import memory, merge, report, roofline
from .cases import (OpSpec, Size, SPECS, case_seed, default_preset, dtype_name, element_size, generator,
                    override_size, resolve_op, sweep_sizes)
from . import targets as _targets
from .baselines import BASELINES
from .cases import DTYPES
from .env import environment
from .impls import GROUPS, Exactly, Impl, build_callables, describe_error, discover, first_tensor, is_oom
from .progress import Progress
from .timing import DEFAULT, Budget, measure

TARGETS = "targets"  # --sizes targets: exactly the cases the issues' targets read (targets.py)


@dataclass
class Config:
    ops: List[str]
    sizes: List[str]                 # preset names, size labels, or "N=1024:D=128" overrides
    dtype: torch.dtype
    impls: Optional[List[str]]       # groups and/or implementation names (None: all; a target run: its own)
    device: torch.device
    quick: bool = False
    sweep: Optional[str] = None      # a dim name, e.g. "N"
    sweep_start: int = 1024
    sweep_max: Optional[int] = None
    sweep_limit_s: Optional[float] = None  # stop an implementation's sweep after a call slower than this
    memory: bool = True
    budget: Budget = field(default=DEFAULT)
    modes: Optional[List[str]] = None      # fwd / bwd / fwd+bwd (None: every mode of each op)
    threads: Optional[int] = None          # CPU threads (torch.set_num_threads); None: torch's default
    progress: Optional[bool] = None        # a progress bar (None: when stderr is a terminal)
    left_out: Dict[str, str] = field(default_factory=dict)  # group or impl name -> why this run skips it
    time_budget_s: Optional[float] = None  # start no case after this many seconds; the rest is pending
    resume: Optional[Dict[str, Any]] = None  # an earlier run's results.json: its measured cases are kept
    resume_name: str = ""                    # where that document came from (merged_from's "file")
    checkpoint: Optional[Path] = None        # rewrite this results.json after every case


@dataclass
class PlanItem:
    spec: OpSpec
    sizes: List[Size]
    dtype: torch.dtype
    modes: Tuple[str, ...]
    impls: List[str]                 # groups and/or implementation names


# ------------------------------------------------------------------------------------------ plan


def _parse_override(item: str) -> Dict[str, int]:
    dims = {}
    for part in item.split(":"):
        k, _, v = part.partition("=")
        if not k or not v.strip().isdigit():
            raise ValueError(f"bad size override {item!r}: write dims as N=1024:D=128")
        dims[k.strip()] = int(v)
    return dims


def sizes_for(spec: OpSpec, items: Sequence[str], device: torch.device) -> List[Size]:
    """The sizes of ``spec`` named by ``items`` (presets, labels of any preset, dim overrides)."""
    out: List[Size] = []
    base = spec.sizes[default_preset(device)][0]
    for item in items:
        if item in spec.sizes:
            out.extend(spec.sizes[item])
        elif "=" in item:
            s = override_size(base, _parse_override(item))
            if s is not None:
                out.append(s)
        else:
            out.extend(s for preset in spec.sizes.values() for s in preset if s.label == item)
    seen, unique = set(), []
    for s in out:
        key = (s.label, s.describe())
        if key not in seen:
            seen.add(key)
            unique.append(s)
    return unique


def case_key(spec: OpSpec, size: Size, dtype: torch.dtype) -> str:
    return f"{spec.name}|{size.label}|{size.describe()}|{dtype_name(dtype)}"


def _case_id(op: str, label: str, dims: Dict[str, int], dtype: str) -> tuple:
    """One case of a results.json: what a resumed run looks up (records carry the same four fields)."""
    return (op, label, json.dumps(dims, sort_keys=True), dtype)


PENDING = ("not run: the run stopped before this case (its --time-budget was spent, or it was killed); "
           "repeat the command with --resume <its results.json>")


def measured_cases(doc: Dict[str, Any]) -> Dict[tuple, List[Dict[str, Any]]]:
    """The cases of an earlier run that a resumed run keeps: every case none of whose records is pending."""
    cases: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in doc["results"]:
        cases.setdefault(_case_id(r["op"], r["size"], r["dims"], r["dtype"]), []).append(r)
    return {k: rs for k, rs in cases.items() if not any(r.get("pending") for r in rs)}


# ------------------------------------------------------------------------------------------- run


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _base_record(spec: OpSpec, size: Size, dtype: torch.dtype, device: torch.device, impl: Impl,
                 mode: str) -> Dict[str, Any]:
    return {
        "op": spec.name, "size": size.label, "dims": dict(size.dims), "source": size.source,
        "dtype": dtype_name(dtype), "device": device.type, "impl": impl.name, "group": impl.group,
        "kind": impl.kind, "mode": mode, "status": "ok", "reason": "", "note": impl.note,
        "median_ms": None, "p20_ms": None, "p80_ms": None, "reps": None, "setup_s": None,
        "peak_mem_bytes": None, "mem_method": None, "rss_growth_bytes": None, "rss_method": None,
        "check_rel_err": None,
    }


def _rel_err(out: Any, ref: Optional[torch.Tensor]) -> Optional[float]:
    t = first_tensor(out)
    if t is None or ref is None or t.shape != ref.shape:
        return None
    a, e = t.detach().double(), ref.double()
    if a.numel() == 0:
        return 0.0
    err = (a - e).abs().max().item()
    return err / max(1.0, e.abs().max().item()) if math.isfinite(err) else float("inf")


def _order(impls: List[Impl]) -> List[Impl]:
    # The eager reference first: the others are checked against its output.
    return sorted(impls, key=lambda i: 0 if i.group == "eager" else 1)


def run_case(spec: OpSpec, size: Size, dtype: torch.dtype, cfg: Config, modes: Sequence[str],
             stopped: Optional[Dict[str, str]] = None, wanted: Optional[Sequence[str]] = None,
             progress: Optional[Progress] = None) -> List[Dict[str, Any]]:
    """Time (and on CUDA, measure the memory of) every implementation of one case."""
    device = cfg.device
    impls = _order(discover(spec, device, wanted if wanted is not None else (cfg.impls or list(GROUPS))))
    log = progress.log if progress is not None else _log
    tick = progress.update if progress is not None else (lambda *a, **k: None)
    records: List[Dict[str, Any]] = []
    stopped = {} if stopped is None else stopped

    def add(impl, mode, **kw):
        r = _base_record(spec, size, dtype, device, impl, mode)
        r.update(kw)
        records.append(r)
        return r

    try:
        inputs = spec.build(size, dtype, device, generator(device, case_seed(spec.name, size, dtype)))
    except Exception as err:  # noqa: BLE001
        status = "oom" if is_oom(err) else "error"
        for impl in impls:
            for mode in modes:
                add(impl, mode, status=status, reason=f"building the inputs: {describe_error(err)}")
        tick(len(impls))
        _free(device)
        return records

    ref: Optional[torch.Tensor] = None
    for impl in impls:
        tick(1, f"{spec.name} {size.label} {impl.name}")
        if impl.name in stopped:
            # Recorded, so tables and the sweep plots say where and why an implementation's curve ends.
            for mode in modes:
                add(impl, mode, status="skipped", reason=f"stopped: {stopped[impl.name]}")
            continue
        skip = cfg.left_out.get(impl.group) or cfg.left_out.get(impl.name) or impl.skip
        if skip:
            for mode in modes:
                add(impl, mode, status="skipped", reason=skip)
            continue
        t0 = time.perf_counter()
        try:
            calls = build_callables(spec, inputs, size, impl, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as err:  # noqa: BLE001 - every failure is a result, the run goes on
            status = "oom" if is_oom(err) else ("skipped" if impl.group in ("peers", "compile", "baselines")
                                                else "error")
            reason = describe_error(err)
            if isinstance(err, ImportError) and impl.group == "peers":
                reason = _import_failure(err, impl)
            elif impl.group == "compile" and status == "skipped":
                reason = f"torch.compile failed: {reason}"
            for mode in modes:
                add(impl, mode, status=status, reason=reason)
            if status == "oom":
                stopped[impl.name] = "out of memory at a smaller size"
            _free(device)
            continue
        setup_s = time.perf_counter() - t0
        check = None
        if spec.inplace:
            pass  # the state moved on between implementations: outputs are not comparable
        elif impl.group == "eager":
            t = first_tensor(calls.output)
            ref = t.detach().clone() if t is not None else None
        else:
            check = _rel_err(calls.output, ref)
        calls.output = None
        for mode in modes:
            rec = add(impl, mode, setup_s=setup_s, check_rel_err=check)
            _measure_mode(rec, calls, mode, cfg)
            if rec["status"] == "oom":
                stopped[impl.name] = "out of memory at a smaller size"
        del calls
        _free(device)
        log(f"  {spec.name:<27} {size.label:<14} {impl.name:<28} "
             + " ".join(f"{r['mode']}={_fmt_ms(r)}" for r in records if r["impl"] == impl.name))
    del inputs, ref
    _free(device)
    return records


def _import_failure(err: ImportError, impl: Impl) -> str:
    try:
        installed = importlib.util.find_spec(impl.module) is not None
    except (ImportError, ValueError):
        installed = False
    if not installed:
        return f"not installed: pip install {impl.kind}"
    version = getattr(sys.modules.get(impl.module), "__version__", "?")
    return f"{impl.module} {version} has no such API: {describe_error(err, 120)}"


def _fmt_ms(r: Dict[str, Any]) -> str:
    return f"{r['median_ms']:.3g}ms" if r["median_ms"] is not None else r["status"]


def _measure_mode(rec: Dict[str, Any], calls, mode: str, cfg: Config) -> None:
    device = cfg.device
    try:
        t = measure(calls.for_mode(mode), device, cfg.budget)  # a "bwd" closure's forward is freed after it
        rec.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.reps)
    except Exception as err:  # noqa: BLE001
        _failed(rec, mode, err, device)
        return
    if cfg.memory and calls.memory_note:
        rec.update(mem_method=calls.memory_note)
    elif cfg.memory:
        peak, method = ((memory.peak_cuda, memory.CUDA_METHOD) if device.type == "cuda"
                        else (memory.peak_cpu_alloc, memory.CPU_ALLOC_METHOD))
        try:
            rec.update(peak_mem_bytes=peak(calls.for_mode(mode)), mem_method=method)
        except Exception as err:  # noqa: BLE001 - the time stands; only the memory is missing
            rec.update(mem_method=f"not measured: {describe_error(err, 100)}")
            _free(device)


def _failed(rec: Dict[str, Any], mode: str, err: Exception, device: torch.device) -> None:
    if is_oom(err):
        rec.update(status="oom", reason=describe_error(err))
    elif mode == "bwd":
        # An autograd.Function that frees its buffers cannot repeat its backward: derive it instead.
        rec.update(status="derived", reason=f"bwd = (fwd+bwd) − fwd; repeated backward failed: "
                                              f"{describe_error(err, 80)}")
    else:
        rec.update(status="error", reason=describe_error(err))
    _free(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _pending_records(spec: OpSpec, size: Size, dtype: torch.dtype, cfg: Config, modes: Sequence[str],
                     wanted: Sequence[str]) -> List[Dict[str, Any]]:
    """A case not run (yet): pending for every implementation that would have run, skipped for the others."""
    out = []
    for impl in _order(discover(spec, cfg.device, wanted)):
        skip = cfg.left_out.get(impl.group) or cfg.left_out.get(impl.name) or impl.skip
        for mode in modes:
            r = _base_record(spec, size, dtype, cfg.device, impl, mode)
            out.append(dict(r, status="skipped", reason=skip) if skip else
                       dict(r, status="skipped", reason=PENDING, pending=True))
    return out


def _sweep_stops(recs: List[Dict[str, Any]], stopped: Dict[str, str], cfg: Config) -> None:
    """After a sweep size: which implementations take no larger size (out of memory, or too slow)."""
    limit = cfg.sweep_limit_s or (0.5 if cfg.quick else 2.0)
    for r in recs:
        r["sweep"] = cfg.sweep
        if r["status"] == "oom":
            stopped.setdefault(r["impl"], "out of memory at a smaller size")
        elif r["status"] == "ok" and r["median_ms"] and r["median_ms"] > limit * 1e3:
            stopped.setdefault(r["impl"], f"over {limit:g} s per call at a smaller size")


def _derive_bwd(records: List[Dict[str, Any]]) -> None:
    by = {(r["op"], r["size"], r["dtype"], r["impl"], r["mode"]): r for r in records}
    for r in records:
        if r["status"] != "derived":
            continue
        f = by.get((r["op"], r["size"], r["dtype"], r["impl"], "fwd"))
        fb = by.get((r["op"], r["size"], r["dtype"], r["impl"], "fwd+bwd"))
        if f and fb and f["median_ms"] is not None and fb["median_ms"] is not None:
            r["median_ms"] = max(fb["median_ms"] - f["median_ms"], 0.0)
            r["status"] = "ok"
        else:
            r["status"] = "error"


def _cpu_rss(records: List[Dict[str, Any]], progress_enabled: Optional[bool] = None,
             log: Callable[[str], None] = _log) -> None:
    """Fill ``rss_growth_bytes`` from one worker process (compiled implementations are not re-compiled there)."""
    jobs: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for r in records:
        if r["status"] != "ok" or r["device"] != "cpu":
            continue
        if r["group"] == "compile":
            r["rss_method"] = "not measured (would recompile in the memory worker)"
            continue
        spec = resolve_op(r["op"])
        size = Size(r["size"], r["dims"], r["source"])
        key = case_key(spec, size, DTYPES[r["dtype"]])
        size_doc = {"label": size.label, "dims": size.dims, "source": size.source}
        j = jobs.setdefault((key, r["impl"]),
                            memory.job(key, r["op"], size_doc, r["dtype"], r["impl"], r["kind"], []))
        j["modes"].append(r["mode"])
    if not jobs:
        return
    n = sum(len(j["modes"]) for j in jobs.values())
    log(f"measuring RSS growth in a worker process ({len(jobs)} implementation × case jobs, {n} measurements) ...")
    with Progress(n, "rss", progress_enabled, unit="meas") as bar:
        results = memory.run_worker(list(jobs.values()),
                                    on_result=lambda r: bar.update(1, f"{r['case'].split('|')[0]} {r['impl']}"))
    for r in records:
        if r["status"] != "ok" or r["device"] != "cpu" or r["group"] == "compile":
            continue
        spec = resolve_op(r["op"])
        key = case_key(spec, Size(r["size"], r["dims"], r["source"]), DTYPES[r["dtype"]])
        res = results.get((key, r["impl"], r["mode"]), {"error": "no result from the memory worker"})
        if "rss_bytes" in res:
            r.update(rss_growth_bytes=res["rss_bytes"], rss_method=memory.RSS_METHOD)
        else:
            r["rss_method"] = f"not measured: {res['error']}"


def _ratios(records: List[Dict[str, Any]]) -> None:
    eager = {(r["op"], r["size"], r["dtype"], r["mode"]): r for r in records
             if r["group"] == "eager" and r["status"] == "ok"}
    for r in records:
        e = eager.get((r["op"], r["size"], r["dtype"], r["mode"]))
        r["speedup_vs_eager"] = (e["median_ms"] / r["median_ms"]
                                 if e and r["status"] == "ok" and r["median_ms"] else None)
        r["mem_vs_eager"] = (r["peak_mem_bytes"] / e["peak_mem_bytes"]
                             if e and r["peak_mem_bytes"] is not None and e["peak_mem_bytes"] else None)


def _work(records: List[Dict[str, Any]], ceilings: Dict[str, Any]) -> None:
    for r in records:
        spec = SPECS[r["op"]]
        flops, nbytes = spec.work(r["dims"], element_size(_DTYPE_OF[r["dtype"]]))[r["mode"]]
        r["flops"], r["bytes"] = flops, nbytes
        own = {**ceilings, **ceilings.get("by_dtype", {}).get(r["dtype"], {})}
        r.update(roofline.place(flops, nbytes, r["median_ms"] if r["status"] == "ok" else None, own))


_DTYPE_OF = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def plan(cfg: Config, log: Callable[[str], None] = _log) -> List[PlanItem]:
    specs = [resolve_op(o) for o in cfg.ops] if cfg.ops else list(SPECS.values())
    # Left-out implementations are planned too, so they are recorded as skipped with the reason.
    wanted = list(dict.fromkeys([*(cfg.impls or GROUPS), *cfg.left_out]))
    out: List[PlanItem] = []
    if TARGETS in cfg.sizes:
        # The targets' own cases, dtypes, modes and implementations (an explicit --impl narrows them).
        names = [s.name for s in specs] if cfg.ops else None
        for op, size, dtype, modes, impls in _targets.cases(cfg.device.type, names):
            chosen = Exactly(i for i in impls if cfg.impls is None or i in cfg.impls or _group_of(i) in cfg.impls)
            out.append(PlanItem(resolve_op(op), [size], DTYPES[dtype], tuple(modes), chosen))
        if not out:
            log(f"no {cfg.device.type} targets for {cfg.ops or 'any op'}")
        rest = [x for x in cfg.sizes if x != TARGETS]
        if not rest:
            return out
        cfg = Config(**{**cfg.__dict__, "sizes": rest})
    for spec in specs:
        if cfg.sweep:
            base = sizes_for(spec, cfg.sizes, cfg.device) or list(spec.sizes[default_preset(cfg.device)])
            stop = cfg.sweep_max or (1 << 20 if cfg.device.type == "cuda" else 1 << 14)
            sizes = sweep_sizes(spec, base[0], cfg.sweep, cfg.sweep_start, stop)
        else:
            sizes = sizes_for(spec, cfg.sizes, cfg.device)
        modes = (spec.primary_mode,) if cfg.sweep else spec.modes
        if cfg.modes:
            modes = tuple(m for m in spec.modes if m in cfg.modes) or (spec.primary_mode,)
        if sizes:
            out.append(PlanItem(spec, sizes, cfg.dtype, modes, list(wanted)))
        elif cfg.sweep:
            log(f"{spec.name}: no dim {cfg.sweep} to sweep; left out")
        else:
            log(f"{spec.name}: none of the sizes {cfg.sizes} apply; left out")
    return out


def _group_of(name: str) -> str:
    if name.startswith("ours"):
        return "ours"
    if name in ("eager", "compile"):
        return name
    return "baselines" if any(b.name == name for bs in BASELINES.values() for b in bs) else "peers"


def run(cfg: Config, log: Callable[[str], None] = _log) -> Dict[str, Any]:
    """Everything the report needs: environment, ceilings, formulas, records, targets."""
    t_start = time.perf_counter()
    device = cfg.device
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    env = environment(device)
    if device.type == "cpu":
        env["rss_resolution_bytes"] = memory.rss_resolution_bytes()
    log(f"device: {env['device_name']} ({device}); torch {env['torch']}, triton {env['triton']}, "
        f"{env['torch_threads']} threads")
    planned = plan(cfg, log)
    dtypes = list(dict.fromkeys(item.dtype for item in planned)) or [cfg.dtype]
    log(f"measuring the roofline (matmul rate in {', '.join(dtype_name(d) for d in dtypes)}, copy bandwidth) ...")
    ceilings = roofline.measure_ceilings(device, dtypes[0], cfg.quick, cfg.budget)
    for extra in dtypes[1:]:
        # A target run mixes dtypes (bf16 losses, fp32 EMA): every matmul rate it needs, measured here.
        more = roofline.measure_ceilings(device, extra, cfg.quick, cfg.budget, copy=False)
        ceilings.setdefault("by_dtype", {})[dtype_name(extra)] = more
    ceilings.setdefault("by_dtype", {})[dtype_name(dtypes[0])] = {
        k: v for k, v in ceilings.items() if k.startswith("matmul")}
    log("  matmul " + ", ".join(f"{v['matmul_tflops']:.3g} TFLOP/s ({k})" for k, v in ceilings["by_dtype"].items())
        + f"; copy {ceilings['copy_gbps']:.3g} GB/s")
    done = measured_cases(cfg.resume) if cfg.resume else {}
    if done:
        log(f"resuming {cfg.resume_name or 'an earlier run'}: {len(done)} cases measured there are not run again")
    cases = [(item, size) for item in planned for size in item.sizes]
    records: List[Dict[str, Any]] = []
    stopped: Dict[int, Dict[str, str]] = {id(item): {} for item in planned}  # per sweep: impl -> why it stopped
    cut: set = set()  # sweeps whose every implementation stopped: their larger sizes are left out
    total = sum(len(item.sizes) * len(discover(item.spec, device, item.impls)) for item in planned)
    with Progress(total, "bench", cfg.progress) as bar:
        for k, (item, size) in enumerate(cases):
            if id(item) in cut:
                continue
            spec = item.spec
            impls_here = discover(spec, device, item.impls)
            earlier = done.get(_case_id(spec.name, size.label, dict(size.dims), dtype_name(item.dtype)))
            if earlier is not None:
                recs = [dict(r) for r in earlier]  # only to carry a sweep's stops on; the merge brings them
                bar.update(len(impls_here))
            elif cfg.time_budget_s is not None and time.perf_counter() - t_start > cfg.time_budget_s:
                recs = _pending_records(spec, size, item.dtype, cfg, item.modes, item.impls)
                records.extend(recs)
                bar.update(len(impls_here))
            else:
                bar.log(f"{spec.name} {size.label} [{size.describe()}] {dtype_name(item.dtype)}")
                recs = run_case(spec, size, item.dtype, cfg, item.modes, stopped[id(item)] if cfg.sweep else None,
                                wanted=item.impls, progress=bar)
                records.extend(recs)
            if cfg.sweep:
                _sweep_stops(recs, stopped[id(item)], cfg)
                if all(i.name in stopped[id(item)] or i.skip for i in impls_here):
                    cut.add(id(item))
                    left = sum(1 for it, _ in cases[k + 1:] if it is item)
                    bar.update(left * len(impls_here))
                    if left:
                        bar.log(f"{spec.name}: every implementation stopped "
                                f"({'; '.join(sorted(set(stopped[id(item)].values())))}); {left} larger sizes left out")
            if cfg.checkpoint is not None and earlier is None:
                rest = [r for it, sz in cases[k + 1:] if id(it) not in cut
                        for r in _pending_records(it.spec, sz, it.dtype, cfg, it.modes, it.impls)]
                _write_checkpoint(_document(cfg, env, ceilings, planned, dtypes, [dict(r) for r in records] + rest,
                                            t_start), cfg.checkpoint)
    _derive_bwd(records)  # before the RSS worker: a derived bwd is measured there like the others
    if cfg.memory and device.type == "cpu":
        _cpu_rss(records, cfg.progress, log)
    return _document(cfg, env, ceilings, planned, dtypes, records, t_start)


def _document(cfg: Config, env: Dict[str, Any], ceilings: Dict[str, Any], planned: List[PlanItem],
              dtypes: List[torch.dtype], records: List[Dict[str, Any]], t_start: float) -> Dict[str, Any]:
    """The run's results.json (derived columns filled in place); merged with the resumed run's, if any."""
    _derive_bwd(records)
    _ratios(records)
    _work(records, ceilings)
    doc = {
        "environment": env,
        "roofline": ceilings,
        "config": {
            "ops": [item.spec.name for item in planned], "sizes": cfg.sizes,
            "dtype": ",".join(dtype_name(d) for d in dtypes),
            "impls": cfg.impls or list(GROUPS), "device": str(cfg.device), "quick": cfg.quick, "sweep": cfg.sweep,
            "modes": cfg.modes, "threads": torch.get_num_threads() if cfg.device.type == "cpu" else None,
            "budget": cfg.budget.__dict__, "time_budget_s": cfg.time_budget_s,
        },
        "formulas": {item.spec.name: item.spec.formula for item in planned},
        "wall_s": time.perf_counter() - t_start,
        "results": records,
    }
    doc["targets"] = _targets.evaluate(doc)
    if cfg.resume:
        doc = merge.merge([cfg.resume, doc], [cfg.resume_name or "resumed run", str(cfg.checkpoint or "this run")])
    return doc


def _write_checkpoint(doc: Dict[str, Any], path: Path) -> None:
    """results.json as it stands (report.write_json replaces it atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    report.write_json(doc, path)
