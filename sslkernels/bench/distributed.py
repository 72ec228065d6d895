"""Per-rank memory and time of the contrastive losses across ranks: ``python -m sslkernels.bench --distributed``.

At a FIXED LOCAL batch (N feature rows per rank, D features) and for each world size, ``world`` real
processes (CPU: gloo, ``--threads`` threads each, default 1; CUDA: NCCL, one process per visible GPU) meet
through a file rendezvous in a temporary folder, and every rank measures forward + backward of its own loss
(``torch.autograd.grad`` of the loss with respect to its features):

  peak   what torch's allocator holds at the peak of one call beyond what it held before it (memory.py:
         the CPU allocator's events from the profiler, ``max_memory_allocated`` on CUDA), after a warm-up
         call; the tables show the largest over ranks
  time   R repeats, each after a ``dist.barrier()`` (``time.perf_counter`` on CPU, CUDA events on GPU); a
         repeat's step time is its slowest rank's, and the tables show the median over repeats

The ring exchange (``distributed="ring"``) holds one neighbour's block at a time, so its per-rank peak
should stay flat as ranks are added; the all-gather ways hold every rank's features (OpenCLIP and the eager
baseline also the n × world·n logits) and grow with the world. World 1 still initializes torch.distributed
(a 1-rank group), which sslkernels and OpenCLIP treat as one process: the baseline of the growth ratios.

Every rank runs the same cases in the same order (collectives must pair up). A case whose warm-up call
raises on any rank (the NotImplementedError of a path not implemented yet, say) is recorded as skipped
(NotImplementedError) or failed (anything else) on all of them: the ranks exchange their errors in one
``all_gather_object`` before anything is measured, and again after the measurement. A failure that breaks
the sequence of collectives (a rank dies inside one) ends that world: the parent stops its ranks, records
the cases left as errors with the rank's last output line, and goes on with the next world size.

Run as ``python -m sslkernels.bench.distributed RANK WORLD INIT_FILE JOB_JSON`` this module is one rank.
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .cases import DTYPES, SPECS, Inputs, Size, case_seed, dtype_name, generator
from .env import environment
from .progress import Progress
from .report import _g, _md_table, _render, write_json

OPS = ("clip_loss", "siglip_loss", "nt_xent", "supcon_loss")
# N=4096:D=512 per rank would take ~20 min on a 2-core CPU (3 ranks: 7-15 s per fwd+bwd call); this, ~3 min.
CPU_DIMS = {"N": 2048, "D": 256}
QUICK_DIMS = {"N": 1024, "D": 256}
CUDA_DIMS = {"N": 16384, "D": 512}
REPEATS = {"cpu": 3, "cuda": 10}   # timed repeats per case (after the warm-up call and the two of the memory peak)
QUICK_REPEATS = 3
SUPCON_CLASSES = 1000
IDLE_TIMEOUT_S = 600.0      # a world whose ranks report nothing for this long is stopped
FLAT = 0.10                 # the issue's target: the ring's per-rank peak within ±10 % of world 1's


# ------------------------------------------------------------------------------------ implementations


@dataclass(frozen=True)
class Impl:
    op: str
    name: str                  # "ours ring", "ours all-gather", "open_clip", "eager all-gather"
    make: Callable[[Inputs, int, int], Callable[[], torch.Tensor]]  # (inputs, rank, world) -> the loss
    module: str = ""           # a package it needs (checked once in the parent, so every rank agrees)
    note: str = ""


# The public functions' positional arguments are the first ones of the registered signature (cases.py).
_PUBLIC_ARGS = {"clip_loss": 3, "siglip_loss": 4, "nt_xent": 3, "supcon_loss": 3}


def _ours(op: str, **flags) -> Callable[[Inputs, int, int], Callable[[], torch.Tensor]]:
    def make(inp: Inputs, rank: int, world: int):
        import sslkernels

        fn, args = getattr(sslkernels, op), inp.args[:_PUBLIC_ARGS[op]]
        return lambda: fn(*args, **flags)
    return make


def _open_clip_clip(inp: Inputs, rank: int, world: int):
    from open_clip.loss import ClipLoss

    loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    i, t, scale = inp.args[:3]
    return lambda: loss(i, t, scale)


def _open_clip_siglip(inp: Inputs, rank: int, world: int):
    from open_clip.loss import SigLipLoss

    loss = SigLipLoss(rank=rank, world_size=world, dist_impl="bidir")
    i, t, scale, bias = inp.args[:4]
    return lambda: loss(i, t, scale, bias)


def _eager_clip(inp: Inputs, rank: int, world: int):
    import torch.nn.functional as F

    from ..distributed import all_gather_with_grad

    i, t, scale = inp.args[:3]
    n = i.shape[0]
    sizes = [n] * world
    labels = torch.arange(n, device=i.device) + rank * n

    def loss():
        # The materializing way: every rank's features, then this rank's n × world·n logits both ways.
        all_i, all_t = all_gather_with_grad(i, sizes), all_gather_with_grad(t, sizes)
        return 0.5 * (F.cross_entropy(scale * i @ all_t.T, labels) + F.cross_entropy(scale * t @ all_i.T, labels))
    return loss


RING, GATHER = "ours ring", "ours all-gather"

IMPLS: Tuple[Impl, ...] = (
    Impl("clip_loss", RING, _ours("clip_loss", distributed="ring")),
    Impl("clip_loss", GATHER, _ours("clip_loss", gather_distributed=True)),
    Impl("clip_loss", "open_clip", _open_clip_clip, "open_clip",
         "open_clip.loss.ClipLoss(local_loss=True, gather_with_grad=True)"),
    Impl("clip_loss", "eager all-gather", _eager_clip, "",
         "all_gather_with_grad + n × world·n logits + F.cross_entropy"),
    Impl("siglip_loss", RING, _ours("siglip_loss", distributed="ring")),
    Impl("siglip_loss", GATHER, _ours("siglip_loss", gather_distributed=True)),
    Impl("siglip_loss", "open_clip", _open_clip_siglip, "open_clip",
         "open_clip.loss.SigLipLoss(dist_impl='bidir'): neighbour exchange, n × n logits per step"),
    Impl("nt_xent", RING, _ours("nt_xent", distributed="ring")),
    Impl("nt_xent", GATHER, _ours("nt_xent", gather_distributed=True)),
    Impl("supcon_loss", RING, _ours("supcon_loss", distributed="ring")),
    Impl("supcon_loss", GATHER, _ours("supcon_loss", gather_distributed=True)),
)
_BY_KEY = {(i.op, i.name): i for i in IMPLS}


def _norm(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


def impl_names() -> List[str]:
    return list(OrderedDict.fromkeys(i.name for i in IMPLS))


def select(ops: Sequence[str], impls: Optional[Sequence[str]]) -> List[Impl]:
    """The implementations of ``ops`` named by ``impls`` (None: all; "ours": both of ours; spaces, dashes and
    case do not matter: ``ours-ring``, ``eager_all_gather``)."""
    wanted = None if impls is None else {_norm(w) for w in impls}
    if wanted is not None:
        known = {_norm(n) for n in impl_names()} | {"ours", "all"}
        unknown = sorted(w for w in impls if _norm(w) not in known)
        if unknown:
            raise ValueError(f"--impl: unknown {unknown} for --distributed; choose from {', '.join(impl_names())}")
    return [i for i in IMPLS if i.op in ops and (wanted is None or "all" in wanted or _norm(i.name) in wanted
                                                  or ("ours" in wanted and i.name.startswith("ours")))]


def local_dims(op: str, dims: Dict[str, int]) -> Dict[str, int]:
    """The op's input dims for N feature rows per rank: NT-Xent's Z = [z1; z2] holds N rows as N/2 pairs,
    so every op's local logits are n × world·n with n = N."""
    n, d = dims["N"], dims["D"]
    if op == "nt_xent":
        return {"N": max(1, n // 2), "D": d}
    if op == "supcon_loss":
        return {"N": n, "D": d, "C": dims.get("C", SUPCON_CLASSES)}
    return {"N": n, "D": d}


# --------------------------------------------------------------------------------------- the plan


@dataclass
class DistConfig:
    ops: List[str]
    worlds: List[int]
    dims: Dict[str, int]                    # N rows per rank, D (and optionally C for supcon)
    dtype: torch.dtype
    device: torch.device
    impls: Optional[List[str]] = None       # --impl names (None: all)
    repeats: int = REPEATS["cpu"]
    threads: int = 1                        # torch / OpenMP threads per rank (CPU)
    quick: bool = False
    progress: Optional[bool] = None
    idle_timeout_s: float = IDLE_TIMEOUT_S
    extra_env: Dict[str, str] = field(default_factory=dict)


def _module_missing(module: str) -> Optional[str]:
    if not module:
        return None
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"{module} is not installed"


def world_skip(device: torch.device, world: int) -> Optional[str]:
    """Why a world size cannot run here (None: it can)."""
    import torch.distributed as dist

    if world < 1:
        return "a world has at least one rank"
    if not dist.is_available():
        return "torch.distributed is not available in this build"
    if device.type == "cuda":
        if not dist.is_nccl_available():
            return "NCCL is not available in this build"
        gpus = torch.cuda.device_count()
        if world > gpus:
            return f"needs {world} GPUs (one process per GPU), {gpus} visible"
        return None
    if not dist.is_gloo_available():
        return "gloo is not available in this build"
    return None


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version({"open_clip": "open_clip_torch"}.get(module, module))
    except Exception:  # noqa: BLE001 - only for the record
        return None


# ----------------------------------------------------------------------------------------- the parent


def run(cfg: DistConfig) -> Dict[str, Any]:
    """Every (world size, op, implementation); returns the results document (report: write_all)."""
    t0 = time.perf_counter()
    chosen = select(cfg.ops, cfg.impls)
    skips = {(i.op, i.name): _module_missing(i.module) for i in chosen}
    records: List[Dict[str, Any]] = []
    with Progress(len(cfg.worlds) * len(chosen), "distributed", cfg.progress, unit="case") as progress:
        for world in cfg.worlds:
            why = world_skip(cfg.device, world)
            runnable = [i for i in chosen if not why and not skips[(i.op, i.name)]]
            done = _run_world(cfg, world, runnable, progress) if runnable else {}
            for impl in chosen:
                key = (impl.op, impl.name)
                r = _record(cfg, world, impl)
                reason = why or skips[key]
                if reason:
                    r.update(status="skipped", reason=reason)
                    progress.log(_line(r))
                    progress.update(1)
                else:
                    r.update(done[key])
                records.append(r)
    _add_growth(records)
    env = environment(cfg.device)
    env["torch_threads"] = cfg.threads if cfg.device.type == "cpu" else env["torch_threads"]
    env["open_clip"] = _version("open_clip")
    return {
        "benchmark": "distributed",
        "environment": env,
        "config": {"ops": cfg.ops, "worlds": cfg.worlds, "dims": cfg.dims, "dtype": dtype_name(cfg.dtype),
                   "device": cfg.device.type, "repeats": cfg.repeats, "threads_per_rank": cfg.threads,
                   "impls": [i.name for i in chosen], "quick": cfg.quick,
                   "backend": "nccl" if cfg.device.type == "cuda" else "gloo"},
        "method": {
            "memory": "per rank: allocator peak of one fwd+bwd call beyond what was held before it, after a warm-up "
                      "call (" + ("cuda max_memory_allocated" if cfg.device.type == "cuda" else
                                  "torch CPU allocator peak from profiler memory events") + "); peak_mem_bytes is "
                      "the largest over ranks",
            "time": "per repeat a dist.barrier(), then each rank times its fwd+bwd; a repeat's step time is the "
                    "slowest rank's; median_ms is the median over repeats",
            "inputs": "fixed local batch: N feature rows per rank (nt_xent: N/2 pairs), random L2-normalized rows, "
                      "seeded per rank",
        },
        "results": records,
        "targets": targets(records),
        "wall_s": time.perf_counter() - t0,
    }


def _record(cfg: DistConfig, world: int, impl: Impl) -> Dict[str, Any]:
    return {
        "op": impl.op, "impl": impl.name, "world": world, "dims": dict(cfg.dims),
        "local_dims": local_dims(impl.op, cfg.dims), "dtype": dtype_name(cfg.dtype), "device": cfg.device.type,
        "mode": "fwd+bwd", "status": "ok", "reason": "", "note": impl.note,
        "peak_mem_bytes": None, "peak_mem_bytes_rank0": None, "peak_mem_bytes_per_rank": None,
        "median_ms": None, "median_ms_rank0": None, "times_ms_per_rank": None, "reps": None,
        "mem_vs_world1": None,
    }


def _worker_env(cfg: DistConfig) -> Dict[str, str]:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if cfg.device.type == "cpu":
        # world ranks × threads each: one thread per rank keeps 3 ranks on 2 cores from oversubscribing.
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(cfg.threads)
    env.update(cfg.extra_env)
    return env


def _run_world(cfg: DistConfig, world: int, impls: List[Impl], progress: Progress) -> Dict[tuple, Dict[str, Any]]:
    """Start ``world`` ranks on ``impls``; returns {(op, impl): fields of its record}."""
    job = {"device": cfg.device.type, "dims": cfg.dims, "dtype": dtype_name(cfg.dtype), "repeats": cfg.repeats,
           "threads": cfg.threads, "timeout_s": cfg.idle_timeout_s,
           "cases": [{"op": i.op, "impl": i.name} for i in impls]}
    out: Dict[tuple, Dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix=f"sslkernels-dist{world}-") as tmp:
        tmpdir = Path(tmp)
        (tmpdir / "job.json").write_text(json.dumps(job))
        logs = [open(tmpdir / f"rank{r}.log", "w") for r in range(world)]
        procs = [subprocess.Popen([sys.executable, "-m", "sslkernels.bench.distributed", str(r), str(world),
                                   str(tmpdir / "rendezvous"), str(tmpdir / "job.json")],
                                  stdout=logs[r], stderr=subprocess.STDOUT, env=_worker_env(cfg))
                 for r in range(world)]
        failure: Optional[str] = None
        last = time.monotonic()
        try:
            while True:
                exited = all(p.poll() is not None for p in procs)  # polled first: the read below sees their lines
                lines = [_read_lines(tmpdir / f"rank{r}.jsonl") for r in range(world)]
                for idx in range(len(impls)):
                    key = (impls[idx].op, impls[idx].name)
                    if key not in out and all(idx in ls for ls in lines):
                        out[key] = merge([ls[idx] for ls in lines])
                        r = dict(_record(cfg, world, impls[idx]), **out[key])
                        progress.log(_line(r))
                        progress.update(1)
                        last = time.monotonic()
                if any(p.poll() not in (None, 0) for p in procs):
                    # The others wait in a collective that will not complete, or fail in it soon: a moment for
                    # them to say so, then the whole world is stopped.
                    deadline = time.monotonic() + 2.0
                    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
                        time.sleep(0.1)
                    failure = _died(procs, tmpdir)
                    break
                if exited:
                    if len(out) < len(impls):
                        failure = f"the ranks exited without a result ({_log_tail(tmpdir, 0)})"
                    break
                if time.monotonic() - last > cfg.idle_timeout_s:
                    failure = (f"stopped: no case finished on every rank in {cfg.idle_timeout_s:.0f} s "
                               f"({_log_tail(tmpdir, 0)})")
                    break
                time.sleep(0.2)
        finally:
            for p in procs:  # never leave a rank behind
                if p.poll() is None:
                    p.kill()
                p.wait()
            for f in logs:
                f.close()
        if failure:
            for impl in impls:
                key = (impl.op, impl.name)
                if key not in out:
                    out[key] = {"status": "error", "reason": failure[:400]}
                    progress.log(_line(dict(_record(cfg, world, impl), **out[key])))
                    progress.update(1)
    return out


def _read_lines(path: Path) -> Dict[int, Dict[str, Any]]:
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:  # the line being written
            continue
        out[r["index"]] = r
    return out


def _log_tail(tmpdir: Path, rank: int) -> str:
    """The last line of a rank's log (usually its exception)."""
    path = tmpdir / f"rank{rank}.log"
    text = path.read_text().strip() if path.exists() else ""
    if not text:
        return f"rank {rank}: no output"
    last = text.splitlines()[-1].strip()
    # Without a traceback the last line is whatever came before (a warning): the rank was killed or exited.
    return f"rank {rank}: {last}" if "Traceback" in text else f"rank {rank}: no traceback, last output: {last[:80]}"


def _died(procs: List[subprocess.Popen], tmpdir: Path) -> str:
    """Which ranks ended a world, and why. A rank that died on its own (killed, a signal, an exit code other
    than the 1 of a caught exception) comes first: the others then only report the connection it closed."""
    dead = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode not in (None, 0)]
    dead.sort(key=lambda rc: rc[1] == 1)
    return "; ".join(f"rank {r} of {len(procs)} exited {rc} ({_log_tail(tmpdir, r)})" for r, rc in dead)


def merge(lines: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One case's per-rank results (rank order) -> the fields of its record.

    Ranks agree on the status by construction (they exchange their errors); rank 0's reason is kept."""
    bad = [ln for ln in lines if ln["status"] != "ok"]
    if bad:
        return {"status": bad[0]["status"], "reason": bad[0]["reason"]}
    peaks = [int(ln["peak_mem_bytes"]) for ln in lines]
    times = [ln["times_ms"] for ln in lines]
    step = [max(ts) for ts in zip(*times)]  # the slowest rank sets a repeat's step time
    return {"status": "ok", "reason": "", "peak_mem_bytes": max(peaks), "peak_mem_bytes_rank0": peaks[0],
            "peak_mem_bytes_per_rank": peaks, "median_ms": statistics.median(step),
            "median_ms_rank0": statistics.median(times[0]), "times_ms_per_rank": times, "reps": len(step)}


def _add_growth(records: List[Dict[str, Any]]) -> None:
    base = {}
    for r in records:
        if r["status"] == "ok" and r["peak_mem_bytes"] is not None:
            k = (r["op"], r["impl"])
            if k not in base or r["world"] < base[k]["world"]:
                base[k] = r
    for r in records:
        b = base.get((r["op"], r["impl"]))
        if r["status"] == "ok" and b is not None and b["world"] == 1 and b["peak_mem_bytes"]:
            r["mem_vs_world1"] = r["peak_mem_bytes"] / b["peak_mem_bytes"]


def _line(r: Dict[str, Any]) -> str:
    head = f"world {r['world']}  {r['op']:<12} {r['impl']:<17}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r['reason']}"
    return (f"{head} peak {_g(r['peak_mem_bytes'] / 2 ** 20)} MiB/rank (rank 0 {_g(r['peak_mem_bytes_rank0'] / 2 ** 20)})"
            f"  {_g(r['median_ms'])} ms")


# ----------------------------------------------------------------------------------------- one rank


def _step(loss_fn: Callable[[], torch.Tensor], leaves: List[torch.Tensor]) -> Callable[[], Any]:
    """Forward + backward returning the input gradients (not stored on the leaves: peak_cpu_alloc runs the
    call twice, and gradients kept from the first would be freed or accumulated inside the measured one)."""
    def step():
        return torch.autograd.grad(loss_fn(), leaves)
    return step


def _describe(err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}"[:300]


def _agree(errors: List[Optional[str]]) -> Optional[Dict[str, Any]]:
    """Every rank's error (None: it ran) -> the case's status for all of them (None: all ran)."""
    bad = [(r, e) for r, e in enumerate(errors) if e]
    if not bad:
        return None
    r, e = bad[0]
    # Not implemented, or a peer that will not import: the case cannot run here (skipped), not a broken one.
    status = ("skipped" if e.startswith(("NotImplementedError", "ImportError", "ModuleNotFoundError")) else
              "oom" if "out of memory" in e.lower() or e.startswith("OutOfMemoryError") else "error")
    where = "" if len(bad) == len(errors) else f" (rank {r} of {len(errors)})"
    return {"status": status, "reason": e + where}


def _measure_case(case: Dict[str, str], job: Dict[str, Any], rank: int, world: int,
                  device: torch.device) -> Dict[str, Any]:
    import torch.distributed as dist

    from .memory import peak_cpu_alloc, peak_cuda

    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def exchange(error: Optional[str]) -> Optional[Dict[str, Any]]:
        errors: List[Optional[str]] = [None] * world
        dist.all_gather_object(errors, error)
        return _agree(errors)

    step, error = None, None
    try:
        spec, dims = SPECS[case["op"]], local_dims(case["op"], job["dims"])
        size = Size("distributed", dims)
        dtype = DTYPES[job["dtype"]]
        inp = spec.build(size, dtype, device, generator(device, case_seed(spec.name, size, dtype) + rank))
        step = _step(_BY_KEY[(case["op"], case["impl"])].make(inp, rank, world), inp.leaves)
        out = step()  # warm-up, and the check that the case runs on every rank before anything is measured
        del out
        sync()
    except Exception as err:  # noqa: BLE001 - recorded; all ranks learn of it in the exchange below
        error = _describe(err)
    agreed = exchange(error)
    if agreed is not None:
        return agreed
    try:
        peak = peak_cuda(step) if cuda else peak_cpu_alloc(step)
        times = []
        for _ in range(job["repeats"]):
            dist.barrier()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = step()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                out = step()
                times.append((time.perf_counter() - t0) * 1e3)
            del out
    except Exception as err:  # noqa: BLE001
        error = _describe(err)
    agreed = exchange(error)
    if agreed is not None:
        return agreed
    return {"status": "ok", "reason": "", "peak_mem_bytes": int(peak), "times_ms": times}


def _worker_main(argv: List[str]) -> None:
    import torch.distributed as dist

    rank, world, init_file, job_path = int(argv[0]), int(argv[1]), argv[2], argv[3]
    try:
        job = json.loads(Path(job_path).read_text())
        if job["device"] == "cuda":
            torch.cuda.set_device(rank)
            device, backend = torch.device("cuda", rank), "nccl"
        else:
            torch.set_num_threads(job["threads"])
            device, backend = torch.device("cpu"), "gloo"
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=_dt.timedelta(seconds=job["timeout_s"]))
        out_path = Path(job_path).with_name(f"rank{rank}.jsonl")
        with open(out_path, "a") as f:
            for idx, case in enumerate(job["cases"]):
                r = _measure_case(case, job, rank, world, device)
                f.write(json.dumps({"index": idx, **r}) + "\n")
                f.flush()
                gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # a process group's teardown would wait for the other ranks
    sys.stdout.flush()
    sys.stderr.flush()
    # Results are on disk: skip the interpreter's teardown, where a process group's threads can still end the
    # process in "terminate called without an active exception" (SIGABRT: a rank reported dead).
    os._exit(0)


# --------------------------------------------------------------------------------- targets and tables


def targets(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The issue's target: the ring CLIP loss's per-rank peak flat (±10 %) from world 1 to the largest world;
    the all-gather ways' growth next to it."""
    out = []
    by = {(r["op"], r["impl"], r["world"]): r for r in records}
    worlds = sorted({r["world"] for r in records})
    if not worlds or "clip_loss" not in {r["op"] for r in records} or 1 not in worlds or len(worlds) < 2:
        return out
    top = worlds[-1]
    ring = [by.get(("clip_loss", RING, w)) for w in worlds]
    if all(r is not None and r["status"] == "ok" for r in ring):
        worst = max(abs(r["mem_vs_world1"] - 1) for r in ring)
        verdict, why = ("PASS" if worst <= FLAT else "FAIL"), ""
        value = ring[-1]["mem_vs_world1"]
    else:
        missing = next(r for r in ring if r is None or r["status"] != "ok")
        verdict, value = "-", None
        why = "not run" if missing is None else f"world {missing['world']}: {missing['reason']}"
    out.append({"target": f"clip_loss {RING}: per-rank peak flat (±{FLAT:.0%}) from world 1 to {top}",
                "value": value, "verdict": verdict, "why": why,
                "compare": {impl: (by.get(("clip_loss", impl, top)) or {}).get("mem_vs_world1")
                            for impl in ("ours all-gather", "open_clip", "eager all-gather")}})
    return out


def _cell_mib(r: Optional[Dict[str, Any]]) -> str:
    if r is None:
        return "-"
    if r["status"] != "ok":
        return {"skipped": "skip"}.get(r["status"], r["status"].upper())
    return _g(r["peak_mem_bytes"] / 2 ** 20)


def table_rows(doc: Dict[str, Any]) -> Tuple[Tuple[str, ...], List[Tuple[str, ...]]]:
    records = doc["results"]
    worlds = doc["config"]["worlds"]
    lo, hi = min(worlds), max(worlds)
    head = ("op", "impl", *[c for w in worlds for c in (f"w{w} MiB/rank", f"w{w} ms")], f"growth {lo}→{hi}")
    by = {(r["op"], r["impl"], r["world"]): r for r in records}
    rows = []
    for op, impl in OrderedDict.fromkeys((r["op"], r["impl"]) for r in records):
        cells = []
        for w in worlds:
            r = by.get((op, impl, w))
            cells += [_cell_mib(r), _g(r["median_ms"]) if r is not None and r["status"] == "ok" else "-"]
        ran = [by[(op, impl, w)] for w in worlds if (op, impl, w) in by and by[(op, impl, w)]["status"] == "ok"]
        growth = "-"
        if len(ran) >= 2 and ran[0]["world"] == lo and ran[0]["peak_mem_bytes"]:
            growth = f"{ran[-1]['peak_mem_bytes'] / ran[0]['peak_mem_bytes']:.2f}x"
            if ran[-1]["world"] != hi:
                growth += f" (→{ran[-1]['world']})"
        rows.append((op, impl, *cells, growth))
    return head, rows


def _not_run(records: List[Dict[str, Any]]) -> List[str]:
    why: "OrderedDict[Tuple[str, str], List[str]]" = OrderedDict()
    for r in records:
        if r["status"] != "ok":
            why.setdefault((f"{r['op']} {r['impl']}", f"{r['status']}: {r['reason']}"), []).append(str(r["world"]))
    return [f"{case} [world {','.join(ws)}]: {reason}" for (case, reason), ws in why.items()]


def _header(doc: Dict[str, Any]) -> List[str]:
    env, cfg = doc["environment"], doc["config"]
    dims = " ".join(f"{k}={v}" for k, v in cfg["dims"].items())
    return [
        f"device: {env['device_name']} ({env['device']}, {cfg['backend']}"
        + (f", {cfg['threads_per_rank']} thread(s) per rank, {env.get('cpu_count')} CPUs" if cfg["device"] == "cpu"
           else "") + f"); torch {env['torch']}, open_clip {env.get('open_clip')}, sslkernels {env.get('sslkernels')} "
        f"(git {env.get('git_commit') or '?'}), {env.get('timestamp', '')}",
        f"fixed local batch {dims} per rank (nt_xent: N/2 pairs), {cfg['dtype']}, fwd+bwd, worlds "
        f"{','.join(map(str, cfg['worlds']))}, {cfg['repeats']} timed repeats; {doc.get('wall_s', 0):.0f} s",
    ]


LEGEND = ("MiB/rank: allocator peak of one fwd+bwd call beyond what was held before it (inputs not counted), "
          "the largest over ranks (results.json has every rank's); ms: median over repeats of the slowest rank's "
          "time, each repeat after a barrier; growth: peak at the largest world / peak at the smallest. "
          "World 1 is a 1-rank process group, i.e. the single-process loss.")


def _target_lines(doc: Dict[str, Any]) -> List[str]:
    lines = []
    for t in doc.get("targets", []):
        got = (f"not measured ({t['why'].split(';')[0][:160]})" if t["value"] is None
               else f"{t['value']:.2f}x at the largest world, {t['verdict']}")
        cmp = ", ".join(f"{k} {v:.2f}x" for k, v in t["compare"].items() if v is not None)
        lines.append(f"{t['target']}: {got}" + (f"; all-gather growth to the same world: {cmp}" if cmp else ""))
    return lines


def text_report(doc: Dict[str, Any]) -> str:
    parts = [f"sslkernels distributed benchmark: per-rank memory vs world size, {doc['environment']['device_name']}",
             *_header(doc), LEGEND, ""]
    targets_ = _target_lines(doc)
    if targets_:
        parts += ["Target", *("  " + t for t in targets_), ""]
    parts.append(_render(*table_rows(doc)))
    not_run = _not_run(doc["results"])
    if not_run:
        parts += ["", "Not run (reason)", *("  " + s for s in not_run)]
    return "\n".join(parts) + "\n"


def markdown_report(doc: Dict[str, Any], plots: List[Path]) -> str:
    parts = [f"# sslkernels distributed benchmark: {doc['environment']['device_name']}", "",
             *(f"- {line}" for line in _header(doc)), f"- {LEGEND}", ""]
    targets_ = _target_lines(doc)
    if targets_:
        parts += ["## Target", "", *(f"- {t}" for t in targets_), ""]
    parts += ["## Per-rank peak memory and time", "", _md_table(*table_rows(doc)), ""]
    if plots:
        parts += [f"![{p.stem}]({p.name})" for p in plots] + [""]
    not_run = _not_run(doc["results"])
    if not_run:
        parts += ["## Not run", "", *(f"- {s}" for s in not_run), ""]
    cmd = ("python -m sslkernels.bench --distributed " + " ".join(doc["config"]["ops"])
           + f" --worlds {','.join(map(str, doc['config']['worlds']))}"
           + " --sizes " + ":".join(f"{k}={v}" for k, v in doc["config"]["dims"].items())
           + f" --dtype {doc['config']['dtype']} --device {doc['config']['device']}")
    parts += ["## Command", "", f"`{cmd}`", ""]
    return "\n".join(parts)


_COLORS = {RING: "#1f77b4", GATHER: "#ff7f0e", "open_clip": "#2ca02c", "eager all-gather": "#7f7f7f"}
# At world 1 ours coincide (the single-process loss), and OpenCLIP's ClipLoss is the eager baseline: hollow
# squares and a dashed line keep both of each pair visible.
_STYLE = {RING: {"marker": "s", "ms": 8, "mfc": "none", "mew": 1.5, "lw": 2},
          "eager all-gather": {"marker": "o", "ms": 4, "ls": "--", "lw": 1.2}}


def write_plot(doc: Dict[str, Any], path: Path) -> Tuple[Optional[Path], Optional[str]]:
    """memory.png: per op a column; top, per-rank peak MiB against world size (log); bottom, the same as a
    ratio to world 1 (linear), with the ±10 % band of a flat curve and the line of growth ∝ world size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        return None, "matplotlib is not installed: no plot (pip install matplotlib)"
    records = [r for r in doc["results"] if r["status"] == "ok" and r["peak_mem_bytes"] is not None]
    ops = [op for op in doc["config"]["ops"] if any(r["op"] == op for r in records)]
    if not ops:
        return None, "no case ran: no plot"
    worlds = doc["config"]["worlds"]
    cfg = doc["config"]
    fig, axes = plt.subplots(2, len(ops), figsize=(4.6 * len(ops), 7.2), squeeze=False, sharex=True)
    for k, op in enumerate(ops):
        top, bottom = axes[0][k], axes[1][k]
        for impl in OrderedDict.fromkeys(r["impl"] for r in records if r["op"] == op):
            rs = sorted((r for r in records if r["op"] == op and r["impl"] == impl), key=lambda r: r["world"])
            xs = [r["world"] for r in rs]
            color = _COLORS.get(impl, "#9467bd")
            style = _STYLE.get(impl, {"marker": "o", "ms": 4})
            top.plot(xs, [max(r["peak_mem_bytes"], 4096) / 2 ** 20 for r in rs], color=color, label=impl, **style)
            for r in rs:
                top.annotate(_g(r["peak_mem_bytes"] / 2 ** 20), (r["world"], max(r["peak_mem_bytes"], 4096) / 2 ** 20),
                             fontsize=6, xytext=(3, 3), textcoords="offset points", color=color)
            ratio = [(r["world"], r["mem_vs_world1"]) for r in rs if r["mem_vs_world1"] is not None]
            if ratio:
                bottom.plot(*zip(*ratio), color=color, label=impl, **style)
        top.set_yscale("log")
        top.margins(x=0.08, y=0.15)
        top.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=30))
        top.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
        top.yaxis.set_minor_formatter(NullFormatter())
        top.set_title(f"{op}  (local {' '.join(f'{a}={b}' for a, b in local_dims(op, cfg['dims']).items())})",
                      fontsize=9, loc="left")
        top.grid(which="major", alpha=0.3)
        bottom.axhspan(1 - FLAT, 1 + FLAT, color="#1f77b4", alpha=0.08, label=f"flat (±{FLAT:.0%})")
        if 1 in worlds:
            bottom.plot(worlds, worlds, ls=":", color="k", lw=0.8, label="∝ world size")
        bottom.grid(alpha=0.3)
        bottom.set_xlabel("world size (ranks)")
        bottom.set_xticks(worlds)
        if k == 0:
            top.set_ylabel("per-rank peak memory, MiB (log)")
            bottom.set_ylabel("per-rank peak / world 1's")
        top.legend(fontsize=7)
        bottom.legend(fontsize=7)
    dims = ", ".join(f"{a}={b}" for a, b in cfg["dims"].items())
    fig.suptitle(f"Per-rank peak memory of fwd+bwd vs world size at a fixed local batch ({dims} rows per rank, "
                 f"{cfg['dtype']}, {cfg['device']} / {cfg['backend']})", fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, None


def write_all(doc: Dict[str, Any], out_dir: Path) -> Dict[str, Any]:
    """results.json, table.txt (also returned), results.md and memory.png in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = text_report(doc)
    write_json(doc, out_dir / "results.json")
    (out_dir / "table.txt").write_text(text)
    plot, why = write_plot(doc, out_dir / "memory.png")
    plots = [plot] if plot is not None else []
    (out_dir / "results.md").write_text(markdown_report(doc, plots))
    files = [out_dir / "results.json", out_dir / "table.txt", out_dir / "results.md", *plots]
    return {"files": files, "text": text, "plots_note": why}


def parse_worlds(text: str) -> List[int]:
    try:
        worlds = sorted({int(w) for w in text.split(",") if w.strip()})
    except ValueError:
        raise ValueError(f"--worlds: a comma list of world sizes like 1,2,3, got {text!r}") from None
    if not worlds or worlds[0] < 1:
        raise ValueError(f"--worlds: world sizes are >= 1, got {text!r}")
    return worlds


def default_dims(device: torch.device, quick: bool) -> Dict[str, int]:
    return dict(QUICK_DIMS if quick else CUDA_DIMS if device.type == "cuda" else CPU_DIMS)


def default_repeats(device: torch.device, quick: bool) -> int:
    return QUICK_REPEATS if quick else REPEATS.get(device.type, REPEATS["cpu"])


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
