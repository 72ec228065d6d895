"""The issues' benchmark targets as data: ``--sizes targets`` runs exactly their cases, and every
report (results.json "targets", results.md, table.txt) shows each target's measured value next to
its threshold.

A target compares one result (op, size, mode, implementation) with a reference: another result of
the same run (eager, a baseline, a peer, another op's case), or a ceiling measured in the same run
(matmul rate, copy bandwidth). Ratios, never absolute numbers, so CPU and GPU runs read the same way.

Metrics (``value`` compared against ``limit`` with ``op``):
  time_ratio    this time / the reference's time                       (≤: at most that fraction of its time)
  speedup       the reference's time / this time                       (≥: at least that many times faster)
  mem_ratio     this peak extra memory / the reference's                (≤)
  matmul_frac   (flops(dims) / matmul rate) / this time                 (≥: fraction of the measured matmul rate)
  floor_ratio   this time / (bytes(dims, s) / copy bandwidth)          (≤: multiple of the memory-traffic floor)
  bw_frac       (bytes(dims, s) / this time) / copy bandwidth          (≥: fraction of the measured bandwidth)
  extra_mem     peak extra memory (beyond the inputs and their gradients), in MB  (≤)
  runs          1 when it ran, 0 when it did not (OOM, error)           (≥ 1)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from .cases import DTYPES, Size, _ema_size, element_size

Dims = Dict[str, int]


@dataclass(frozen=True)
class Target:
    issue: str
    device: str                                  # "cpu" or "cuda"
    op: str
    size: Size
    dtype: str                                   # "fp32", "bf16", ...
    metric: str
    limit: float
    text: str                                    # the target as the issue states it
    mode: str = "fwd+bwd"
    impl: str = "ours"
    vs: Optional[Tuple[str, str, str]] = None    # (op, size label, impl) of the reference result
    amount: Optional[Callable[[Dims, int], float]] = None  # flops / bytes of the metric, from dims and bytes/elem

    @property
    def cmp(self) -> str:
        return ">=" if self.metric in ("speedup", "matmul_frac", "bw_frac", "runs") else "<="


def _S(label: str, source: str, **dims) -> Size:
    return Size(label, dict(dims), source)


# --------------------------------------------------------------------------------------------- CPU

_I3 = "issue 3"
_I4 = "issue 4"
_I5 = "issue 5"
_I10 = "issue 10"

_CPU_INFO = _S("cpu-target", "issue 3 CPU target", N=8192, M=8192, D=128)
_CPU_NTX = _S("simclr", "SimCLR (Chen et al. 2020): batch 4096, 128-d projections", N=4096, D=128)
_CPU_DINO = _S("small", "issue 5 CPU target: DINO's 2 global + 10 local crops at small P", B=16, S=12, T=2, P=16384)
_R50 = _ema_size("resnet50")

_CPU: Tuple[Target, ...] = (
    Target(_I3, "cpu", "info_nce", _CPU_INFO, "fp32", "mem_ratio", 0.10,
           "info_nce N=8192 D=128 fwd+bwd peak memory growth ≤ 10% of eager's", vs=("info_nce", "cpu-target", "eager")),
    Target(_I3, "cpu", "info_nce", _CPU_INFO, "fp32", "time_ratio", 1.0,
           "info_nce N=8192 D=128 fwd+bwd time ≤ 1.0× eager's", vs=("info_nce", "cpu-target", "eager")),
    Target(_I3, "cpu", "nt_xent", _CPU_NTX, "fp32", "mem_ratio", 0.10,
           "nt_xent N=4096 D=128 fwd+bwd peak memory growth ≤ 10% of eager's", vs=("nt_xent", "simclr", "eager")),
    Target(_I3, "cpu", "nt_xent", _CPU_NTX, "fp32", "time_ratio", 1.0,
           "nt_xent N=4096 D=128 fwd+bwd time ≤ 1.0× eager's", vs=("nt_xent", "simclr", "eager")),
    Target(_I5, "cpu", "dino_loss", _CPU_DINO, "fp32", "mem_ratio", 0.25,
           "dino_loss (small P) fwd+bwd memory ≤ 25% of eager's", vs=("dino_loss", "small", "eager")),
    Target(_I5, "cpu", "dino_loss", _CPU_DINO, "fp32", "time_ratio", 1.0,
           "dino_loss (small P) fwd+bwd at no more time than eager", vs=("dino_loss", "small", "eager")),
    Target(_I4, "cpu", "ema_update_", _R50, "fp32", "speedup", 1.0,
           "ema_update_ ResNet-50 list ≥ 1.0× torch._foreach_lerp_", mode="fwd",
           vs=("ema_update_", "resnet50", "foreach_lerp")),
    Target(_I4, "cpu", "ema_update_", _R50, "fp32", "speedup", 5.0,
           "ema_update_ ResNet-50 list ≥ 5× a per-parameter Python loop", mode="fwd",
           vs=("ema_update_", "resnet50", "python_loop")),
)

# --------------------------------------------------------------------------------------------- GPU


def _eight_n2d(d: Dims, s: int) -> float:  # the issues count fwd + recomputation + dQ + dK
    return 8.0 * d["N"] * d["N"] * d["D"]


def _queue_twice(d: Dims, s: int) -> float:
    # copy_gbps counts read + write bytes; reading the queue twice moves 2·K·D·s bytes.
    return 2.0 * d["K"] * d["D"] * s


def _dino_floor(d: Dims, s: int) -> float:  # read student and teacher logits once, write the gradient once
    return (d["S"] + d["T"]) * d["B"] * d["P"] * s + d["S"] * d["B"] * d["P"] * s


def _ema_bytes(d: Dims, s: int) -> float:  # 12 bytes per fp32 parameter: read t and s, write t
    return 3.0 * d["P"] * s


_GPU_INFO = _S("gpu-target", "issues 3/10: N=32768, D=256", N=32768, M=32768, D=256)
_GPU_CLIP = _S("gpu-target", "issues 3/10: N=32768, D=256", N=32768, D=256)
_GPU_NTX = _S("gpu-target", "issues 3/10: 2N=32768, D=256", N=16384, D=256)
_GPU_BIG = _S("n262k", "issues 3/10: N=262144 on one GPU", N=262144, M=262144, D=256)
_MOCO = _S("mocov2", "MoCo v2 (Chen et al. 2020): batch 256, queue 65536, 128-d", N=256, K=65536, D=128)
_VITB = _ema_size("vit-b")
_DINO = _S("dino", "DINO (Caron et al. 2021): 64 images/GPU, 2 global + 10 local crops, 65536 prototypes",
           B=64, S=12, T=2, P=65536)
_SINK = _S("gpu-target", "issue 5: Sinkhorn B=1024, P=65536", B=1024, P=65536)


def _vs(op, label, impl):
    return (op, label, impl)


_GPU: Tuple[Target, ...] = (
    *(t for op, size in (("info_nce", _GPU_INFO), ("clip_loss", _GPU_CLIP)) for t in (
        Target(_I10, "cuda", op, size, "bf16", "matmul_frac", 0.5,
               f"{op} N=32768 D=256 bf16 fwd+bwd ≥ 50% of the measured bf16 matmul rate (8·N²·D flops)",
               amount=_eight_n2d),
        Target(_I10, "cuda", op, size, "bf16", "speedup", 2.0, f"{op} N=32768 bf16 fwd+bwd ≥ 2× eager",
               vs=_vs(op, "gpu-target", "eager")),
        Target(_I10, "cuda", op, size, "bf16", "speedup", 1.5, f"{op} N=32768 bf16 fwd+bwd ≥ 1.5× Inf-CL",
               vs=_vs(op, "gpu-target", "inf_cl")),
        Target(_I10, "cuda", op, size, "bf16", "speedup", 1.2,
               f"{op} N=32768 bf16 fwd+bwd ≥ 1.2× torch.compile of the reference", vs=_vs(op, "gpu-target", "compile")),
    )),
    Target(_I3, "cuda", "info_nce", _GPU_INFO, "bf16", "extra_mem", 2.0,
           "info_nce N=32768 fwd+bwd: extra memory beyond the inputs and their gradients ≤ 1 MB per 16k rows (MB)"),
    Target(_I10, "cuda", "nt_xent", _GPU_NTX, "bf16", "time_ratio", 0.6,
           "nt_xent 2N=32768 bf16 fwd+bwd ≤ 0.6× the time of info_nce N=32768", vs=_vs("info_nce", "gpu-target", "ours")),
    Target(_I10, "cuda", "info_nce", _GPU_BIG, "bf16", "runs", 1.0, "info_nce N=262144 bf16 fwd+bwd runs on one GPU"),
    Target(_I10, "cuda", "ema_update_", _VITB, "fp32", "bw_frac", 0.85,
           "ema_update_ ViT-B (86M fp32) ≥ 85% of measured copy bandwidth (12 B/param)", mode="fwd", amount=_ema_bytes),
    Target(_I10, "cuda", "ema_update_", _VITB, "fp32", "speedup", 1.0, "ema_update_ ViT-B ≥ 1.0× torch._foreach_lerp_",
           mode="fwd", vs=_vs("ema_update_", "vit-b", "foreach_lerp")),
    Target(_I4, "cuda", "ema_update_", _VITB, "fp32", "speedup", 10.0, "ema_update_ ViT-B ≥ 10× the Python loop",
           mode="fwd", vs=_vs("ema_update_", "vit-b", "python_loop")),
    Target(_I10, "cuda", "dino_loss", _DINO, "bf16", "floor_ratio", 1.5,
           "dino_loss B=64×12 crops P=65536 fwd+bwd ≤ 1.5× its memory-traffic floor", amount=_dino_floor),
    Target(_I5, "cuda", "dino_loss", _DINO, "bf16", "mem_ratio", 0.05, "dino_loss P=65536 peak extra memory ≤ 5% of eager's",
           vs=_vs("dino_loss", "dino", "eager")),
    Target(_I5, "cuda", "sinkhorn_knopp", _SINK, "bf16", "speedup", 3.0, "sinkhorn_knopp B=1024 P=65536 ≥ 3× eager",
           mode="fwd", vs=_vs("sinkhorn_knopp", "gpu-target", "eager")),
    Target(_I10, "cuda", "moco_loss", _MOCO, "bf16", "floor_ratio", 2.0,
           "moco_loss N=256 K=65536 D=128 fwd+bwd ≤ 2× the time to read the queue twice", amount=_queue_twice),
    # The same step replayed from a CUDA graph: ~22 µs of kernels is below one eager step's host work
    # (benchmarks/NOTES.md, "Host work per step"), so the target is only within reach without it. Last in the
    # run: the first capture of this step on a GPU; a failed capture should not take other cases with it.
    Target(_I10, "cuda", "moco_loss", _MOCO, "bf16", "floor_ratio", 2.0,
           "moco_loss N=256 K=65536 D=128 fwd+bwd, replayed from a CUDA graph, ≤ 2× reading the queue twice",
           impl="ours:graph", amount=_queue_twice),
)

TARGETS: Dict[str, Tuple[Target, ...]] = {"cpu": _CPU, "cuda": _GPU}


def targets_for(device_type: str) -> Tuple[Target, ...]:
    return TARGETS.get(device_type, ())


def cases(device_type: str, ops: Optional[List[str]] = None) -> List[Tuple[str, Size, str, Tuple[str, ...], Tuple[str, ...]]]:
    """(op, size, dtype, modes, impls) of every case the targets of ``device_type`` read, once each.

    ``impls`` are the implementations the targets compare in that case (ours and their references),
    so a target run spends no time on others (eager at N=262144 would only run out of memory).
    ``ops`` (optional) keeps only those ops' targets; references in other ops' cases come along.
    """
    need: Dict[Tuple[str, str, str], Tuple[Size, List[str], List[str]]] = {}

    def add(op, size, dtype, mode, names):
        _, modes, impls_ = need.setdefault((op, size.label, dtype), (size, [], []))
        for lst, items in ((modes, [mode]), (impls_, names)):
            lst.extend(x for x in items if x not in lst)

    for t in targets_for(device_type):
        if ops and t.op not in ops:
            continue
        same = t.vs is not None and (t.vs[0], t.vs[1]) == (t.op, t.size.label)
        add(t.op, t.size, t.dtype, t.mode, [t.impl] + ([t.vs[2]] if same else []))
        if t.vs and not same:  # another case of the run (nt_xent against info_nce)
            ref = next(x for x in targets_for(device_type) if (x.op, x.size.label) == t.vs[:2])
            add(ref.op, ref.size, t.dtype, t.mode, [t.vs[2]])
    return [(op, size, dt, tuple(modes), tuple(names)) for (op, _, dt), (size, modes, names) in need.items()]


def impls(device_type: str) -> List[str]:
    """Every implementation the targets of ``device_type`` read."""
    out: List[str] = []
    for *_, names in cases(device_type):
        out.extend(n for n in names if n not in out)
    return out


# ------------------------------------------------------------------------------------------ evaluation


def _find(records, op, label, dtype, impl, mode) -> Optional[Dict[str, Any]]:
    for r in records:
        if (r["op"], r["size"], r["dtype"], r["impl"], r["mode"]) == (op, label, dtype, impl, mode):
            return r
    return None


def _ok(r) -> bool:
    return r is not None and r["status"] == "ok" and r["median_ms"]


def _value(t: Target, r, ref, ceilings) -> Tuple[Optional[float], str]:
    """(value, why not) of target ``t`` from its result ``r`` and reference ``ref``."""
    if t.metric == "runs":
        if r is None or r["status"] not in ("ok", "oom", "error"):  # pending or skipped: not tried, no verdict
            return None, "not run" if r is None else f"{r['status']}: {r['reason']}"
        return (1.0 if r["status"] == "ok" else 0.0), ("" if r["status"] == "ok" else f"{r['status']}: {r['reason']}")
    if not _ok(r):
        return None, f"{t.impl}: " + ("not run" if r is None else f"{r['status']} {r['reason']}".strip())
    s = element_size(DTYPES[t.dtype])
    sec = r["median_ms"] * 1e-3
    if t.metric in ("time_ratio", "speedup", "mem_ratio"):
        if not _ok(ref):
            name = t.vs[2] if t.vs else "?"
            return None, f"{name}: " + ("not run" if ref is None else f"{ref['status']} {ref['reason']}".strip())
        if t.metric == "mem_ratio":
            if r["peak_mem_bytes"] is None or not ref["peak_mem_bytes"]:
                return None, "memory not measured"
            return r["peak_mem_bytes"] / ref["peak_mem_bytes"], ""
        ratio = r["median_ms"] / ref["median_ms"]
        return (ratio if t.metric == "time_ratio" else 1.0 / ratio), ""
    if t.metric == "extra_mem":
        if r["peak_mem_bytes"] is None:
            return None, "memory not measured"
        return r["peak_mem_bytes"] / 1e6, ""
    amount = t.amount(r["dims"], s)
    if t.metric == "matmul_frac":
        return amount / (ceilings["matmul_tflops"] * 1e12) / sec, ""
    if t.metric == "floor_ratio":
        return sec / (amount / (ceilings["copy_gbps"] * 1e9)), ""
    if t.metric == "bw_frac":
        return amount / sec / 1e9 / ceilings["copy_gbps"], ""
    raise ValueError(f"unknown metric {t.metric}")


def evaluate(doc: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every target of the run's device whose case is in the run, with its value and verdict."""
    records = doc["results"]
    device = doc["config"]["device"].split(":")[0]
    out = []
    for t in targets_for(device):
        r = _find(records, t.op, t.size.label, t.dtype, t.impl, t.mode)
        if r is None or r["dims"] != t.size.dims:
            continue
        ref = None
        if t.vs:
            ref = _find(records, t.vs[0], t.vs[1], t.dtype, t.vs[2], t.mode)
        # A merged or resumed document: each record against the ceilings of the run that measured it.
        roof = doc["merged_from"][r["run"]]["roofline"] if doc.get("merged_from") and "run" in r else doc["roofline"]
        value, why = _value(t, r, ref, {**roof, **roof.get("by_dtype", {}).get(t.dtype, {})})
        verdict = "-" if value is None else (
            "pass" if (value >= t.limit if t.cmp == ">=" else value <= t.limit) else "FAIL")
        out.append({
            "issue": t.issue, "target": t.text, "op": t.op, "size": t.size.label, "dims": dict(t.size.dims),
            "dtype": t.dtype, "mode": t.mode, "metric": t.metric, "limit": t.limit, "cmp": t.cmp,
            "value": value, "verdict": verdict, "why": why,
            "ms": r["median_ms"] if _ok(r) else None, "peak_mem_bytes": r.get("peak_mem_bytes"),
            "vs": "/".join(t.vs) if t.vs else "", "vs_ms": ref["median_ms"] if _ok(ref) else None,
            "vs_peak_mem_bytes": ref.get("peak_mem_bytes") if ref else None,
        })
    return out
