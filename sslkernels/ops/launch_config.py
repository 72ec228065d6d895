"""Launch configurations and engine switches of the fused contrastive kernels (ops/contrastive.py).

Device: the half-precision v2 rows for 64 < D ≤ 256 were tuned on an H100 (sm_90) with the opt-in
autotuner (see the FWD table's comment); the other rows are untuned, chosen for correctness and checked
offline (``scripts/triton_compile_check.py`` prints registers, spills and shared memory for sm_80/sm_90).
benchmarks/NOTES.md holds each change's prediction and measured outcome.
Two engines, both kept so one run can compare them (``SSLKERNELS_CONTRASTIVE_ENGINE=v1|v2``):
  v1  the first engine: every key tile reloads the query tile once per feature chunk, the backward
      recomputes the logits once per output feature chunk, an online max per row, a second forward pass
      for the column LSE of symmetric losses.
  v2  (default) the query tile stays resident across key tiles when D fits (``block_d = 0`` below: the
      whole of D in one tile), the backward loads each key tile once for both of its dots (``block_dout
      = 0``: every feature column in one program), and the fixed-shift exp (``SSLKERNELS_CONTRASTIVE_SHIFT=
      fixed|online``) lets one pass produce row and column sums and NT-Xent/SupCon walk only the upper
      triangle of Z·Zᵀ tiles (``SSLKERNELS_CONTRASTIVE_SELF_REUSE=1|0``).

A row of a table applies to inputs whose feature dimension D is at most its bound (None: any D).
``block_d`` / ``block_dout`` = 0 mean "all of D" (rounded up to a power of two, at least 16).

Autotuning is opt-in (``SSLKERNELS_AUTOTUNE=1``, CUDA only): the first launch of each (kernel, dtype,
D bucket, mode) times the ``CANDIDATES`` below with triton.testing.do_bench, keeps the fastest for the
process and prints it, so a GPU session can paste the winners into the tables.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
import triton

from ._common import next_pow2


class Config(NamedTuple):
    block_m: int  # rows of the program's tile (queries; keys in the dK pass)
    block_n: int  # rows streamed per step (keys; queries in the dK pass)
    block_d: int  # feature chunk of the logits dot product; 0: all of D, the tile stays resident
    block_dout: int  # cap on the feature columns of a backward program's output; 0: all of D
    num_warps: int
    num_stages: int


_Table = Dict[str, List[Tuple[Optional[int], Config]]]

# ---------------------------------------------------------------------------------------------- v1
# "half" covers float16 and bfloat16 (same tile footprint); "fp32" float32. Untuned (v1's first table).
V1_FWD: _Table = {
    "half": [(None, Config(128, 64, 64, 0, 8, 3))],
    "fp32": [(None, Config(64, 64, 32, 0, 4, 2))],
}
V1_BWD_ROWS: _Table = {
    "half": [(None, Config(64, 64, 64, 128, 8, 2))],
    "fp32": [(None, Config(64, 32, 32, 128, 8, 2))],
}
V1_BWD_COLS: _Table = {
    "half": [(None, Config(64, 64, 64, 128, 8, 2))],
    "fp32": [(None, Config(64, 32, 32, 128, 8, 2))],
}

# ---------------------------------------------------------------------------------------------- v2
# Half precision at 64 < D ≤ 256: tuned on an H100 SXM (sm_90, triton 3.6, torch 2.11, 2026-11-23) by
# SSLKERNELS_AUTOTUNE=1 at N = 32768, D = 256, bf16 (benchmarks/results/h100/tune2/tune.log): the 4-warp,
# 3-stage 64×32 backward tiles run 2.1× faster than the untuned 8-warp 64×64 ones (bwd_rows 2.12 vs
# 4.40 ms, bwd_cols 2.81 vs 6.17 ms), the 128×32 forward 1.3× (1.55 vs 2.07 ms), and the 128² self-
# similarity forward 1.5× (1.80 vs 2.72 ms) despite a small register spill. Other rows: untuned.
# Resident tiles up to D = 256 (half) / 128 (fp32); above those bounds the kernels chunk D as v1 does.
FWD: _Table = {
    "half": [(64, Config(128, 64, 0, 0, 4, 3)), (256, Config(128, 32, 0, 0, 4, 3)),
             (None, Config(128, 64, 64, 0, 8, 3))],
    "fp32": [(128, Config(64, 64, 0, 0, 4, 2)), (None, Config(64, 64, 32, 0, 4, 2))],
}
# The self-similarity forward (NT-Xent / SupCon over the upper triangle of tiles): block_m = block_n.
SELF_FWD: _Table = {
    "half": [(64, Config(128, 128, 0, 0, 8, 2)), (256, Config(128, 128, 0, 0, 8, 2)),
             (None, Config(64, 64, 64, 0, 8, 3))],
    "fp32": [(128, Config(64, 64, 0, 0, 4, 2)), (None, Config(64, 64, 32, 0, 4, 2))],
}
BWD_ROWS: _Table = {
    "half": [(256, Config(64, 32, 0, 0, 4, 3)), (None, Config(64, 64, 64, 128, 8, 2))],
    "fp32": [(128, Config(64, 32, 0, 0, 8, 2)), (None, Config(64, 32, 32, 128, 8, 2))],
}
BWD_COLS: _Table = {
    "half": [(256, Config(64, 32, 0, 0, 4, 3)), (None, Config(64, 64, 64, 128, 8, 2))],
    "fp32": [(128, Config(64, 32, 0, 0, 8, 2)), (None, Config(64, 32, 32, 128, 8, 2))],
}
TABLES = {
    "v1": {"fwd": V1_FWD, "bwd_rows": V1_BWD_ROWS, "bwd_cols": V1_BWD_COLS},
    "v2": {"fwd": FWD, "self_fwd": SELF_FWD, "bwd_rows": BWD_ROWS, "bwd_cols": BWD_COLS},
}

# Opt-in autotuning candidates (v2, D ≤ the resident bound; larger D keeps the table entry). Small on
# purpose: each is a compile (~2–5 s) plus a do_bench per (kernel, dtype, D bucket, mode).
CANDIDATES: Dict[str, List[Config]] = {
    "fwd": [Config(128, 64, 0, 0, 8, 2), Config(128, 64, 0, 0, 8, 3), Config(128, 128, 0, 0, 8, 2),
            Config(64, 64, 0, 0, 4, 3), Config(128, 32, 0, 0, 4, 3), Config(128, 64, 0, 0, 8, 4),
            Config(64, 128, 0, 0, 8, 2)],
    "self_fwd": [Config(128, 128, 0, 0, 8, 2), Config(64, 64, 0, 0, 4, 3), Config(128, 128, 0, 0, 8, 3),
                 Config(64, 64, 0, 0, 8, 2)],
    "bwd_rows": [Config(64, 64, 0, 0, 8, 2), Config(64, 64, 0, 0, 4, 2), Config(128, 64, 0, 0, 8, 2),
                 Config(64, 32, 0, 0, 4, 3), Config(64, 128, 0, 0, 8, 2), Config(64, 64, 0, 0, 8, 3),
                 Config(64, 64, 0, 0, 4, 3)],
    "bwd_cols": [Config(64, 64, 0, 0, 8, 2), Config(64, 64, 0, 0, 4, 2), Config(128, 64, 0, 0, 8, 2),
                 Config(64, 32, 0, 0, 4, 3), Config(64, 128, 0, 0, 8, 2), Config(64, 64, 0, 0, 8, 3),
                 Config(64, 64, 0, 0, 4, 3)],
}
RESIDENT_MAX_D = {"half": 256, "fp32": 128}


# ----------------------------------------------------------------------------------- engine switches


class Engine(NamedTuple):
    version: str = "v2"  # "v1" | "v2"
    shift: str = "fixed"  # v2: "fixed" (device-side bound, guarded) | "online" (running max, as v1)
    self_reuse: bool = True  # v2 + fixed: NT-Xent/SupCon forward over the upper triangle of tiles
    one_exp_bwd: bool = True  # v2: two-sided backward with one exp per logit (guarded by a device flag)


_engine_override: Dict[str, object] = {}


def _env_flag(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    return default if v is None or v == "" else v not in ("0", "false", "False", "no")


_ENGINE_VARS = ("SSLKERNELS_CONTRASTIVE_ENGINE", "SSLKERNELS_CONTRASTIVE_SHIFT", "SSLKERNELS_CONTRASTIVE_SELF_REUSE",
                "SSLKERNELS_CONTRASTIVE_ONE_EXP_BWD")
_engines: Dict[tuple, Engine] = {}  # a loss asks a few times per step: host time is what small batches pay


def engine() -> Engine:
    """The engine settings in force: defaults, then environment variables, then ``use_engine``."""
    key = (tuple(os.environ.get(v) for v in _ENGINE_VARS), tuple(sorted(_engine_override.items())))
    e = _engines.get(key)
    if e is not None:
        return e
    e = Engine(version=os.environ.get("SSLKERNELS_CONTRASTIVE_ENGINE", "v2") or "v2",
               shift=os.environ.get("SSLKERNELS_CONTRASTIVE_SHIFT", "fixed") or "fixed",
               self_reuse=_env_flag("SSLKERNELS_CONTRASTIVE_SELF_REUSE", True),
               one_exp_bwd=_env_flag("SSLKERNELS_CONTRASTIVE_ONE_EXP_BWD", True))
    e = e._replace(**_engine_override)
    if e.version not in ("v1", "v2") or e.shift not in ("fixed", "online"):
        raise ValueError(f"unknown contrastive engine setting {e}: version v1|v2, shift fixed|online")
    _engines[key] = e
    return e


@contextlib.contextmanager
def use_engine(**fields) -> Iterator[None]:
    """Force engine settings (tests, benchmarks comparing v1 and v2 in one process)."""
    global _engine_override
    unknown = set(fields) - set(Engine._fields)
    if unknown:
        raise ValueError(f"unknown engine fields {sorted(unknown)}; known: {Engine._fields}")
    saved = _engine_override
    _engine_override = {**saved, **fields}
    try:
        yield
    finally:
        _engine_override = saved


# ------------------------------------------------------------------------------------------ configs

_override: Dict[str, int] = {}


def _dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def _pad(d: int) -> int:
    return max(16, next_pow2(d))  # tl.dot's minimum


def resolve(cfg: Config, d: int) -> Config:
    """Turn the table's "all of D" zeros into sizes, and cap the output chunk at D."""
    dpad = _pad(d)
    block_d = dpad if cfg.block_d == 0 else min(cfg.block_d, dpad)
    dout = dpad if cfg.block_dout == 0 else min(dpad, cfg.block_dout)
    return cfg._replace(block_d=block_d, block_dout=dout)


_configs: Dict[tuple, Config] = {}


def get(kernel: str, dtype: torch.dtype, d: int, version: Optional[str] = None) -> Config:
    """The config of ``kernel`` ("fwd", "self_fwd", "bwd_rows", "bwd_cols") for ``dtype`` and dimension ``d``."""
    key = (kernel, _dtype_class(dtype), d, version or engine().version, tuple(sorted(_override.items())))
    cfg = _configs.get(key)
    if cfg is None:
        for bound, cfg in TABLES[key[3]][kernel][key[1]]:
            if bound is None or d <= bound:
                break
        cfg = _configs[key] = resolve(cfg._replace(**_override), d)
    return cfg


def is_resident(cfg: Config, d: int) -> bool:
    """The whole feature dimension fits one tile: load it once per program (and, in the backward, one
    key tile serves both the logits dot and the gradient dot)."""
    return cfg.block_d >= d and cfg.block_dout == cfg.block_d


@contextlib.contextmanager
def override(**fields: int) -> Iterator[None]:
    """Force config fields for every kernel (tests: tiny tiles so small inputs span several of them)."""
    global _override
    unknown = set(fields) - set(Config._fields)
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}; known: {Config._fields}")
    saved = _override
    _override = {**saved, **fields}
    try:
        yield
    finally:
        _override = saved


# ---------------------------------------------------------------------------------------- autotune

_tuned: Dict[tuple, Config] = {}


def autotune_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and not _override and _env_flag("SSLKERNELS_AUTOTUNE", False)


def tuned_configs() -> Dict[tuple, Config]:
    """Winners so far: {(kernel, dtype, D bucket, mode key): Config}."""
    return dict(_tuned)


def autotune(kernel: str, dtype: torch.dtype, d: int, key: tuple, run: Callable[[Config], object]) -> Config:
    """The fastest of ``CANDIDATES[kernel]`` (plus the table's entry) for this key; ``run(cfg)`` launches
    the kernel on throwaway outputs. D larger than the resident bound keeps the table entry."""
    full_key = (kernel, str(dtype), _pad(d), key)
    if full_key in _tuned:
        return _tuned[full_key]
    base = get(kernel, dtype, d)
    if d > RESIDENT_MAX_D[_dtype_class(dtype)]:
        _tuned[full_key] = base
        return base
    best, best_ms, report = base, float("inf"), []
    seen = set()
    for cand in [base] + [resolve(c, d) for c in CANDIDATES[kernel]]:
        if cand in seen:
            continue
        seen.add(cand)
        try:
            ms = triton.testing.do_bench(lambda: run(cand), warmup=5, rep=25)
        except Exception as exc:  # out of shared memory / registers: not a candidate here
            report.append(f"{tuple(cand)}: {type(exc).__name__}")
            continue
        report.append(f"{tuple(cand)}: {ms:.3f} ms")
        if ms < best_ms:
            best, best_ms = cand, ms
    _tuned[full_key] = best
    print(f"[sslkernels autotune] {full_key} -> {tuple(best)} ({best_ms:.3f} ms); " + "; ".join(report),
          file=sys.stderr)
    return best
