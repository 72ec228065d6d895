"""Launch configurations of the fused contrastive kernels (ops/contrastive.py): one table per kernel.

Device: untuned — chosen for correctness, to be tuned on H100 (sm_90, triton 3.6). No timing has been
taken. The entries follow the usual shape of a flash-attention tile (64–128 query rows, 64 key columns,
feature chunks of 64; 32 for fp32, whose tiles take twice the shared memory) and were checked offline
only: every kernel variant compiles for sm_90 with triton 3.6 and 3.8, and ptxas reports no register
spills (8 warps; 4 warps spilled in the half-precision kernels, as did a 256-column backward output).

A row of a table applies to inputs whose feature dimension D is at most its bound (None: any D).
``block_dout`` caps the feature columns one backward program writes: it holds a BLOCK×block_dout fp32
accumulator in registers, so a larger D is split over programs that each recompute the logits tile.

Autotuning is opt-in (not wired yet): a fixed table keeps launches reproducible and compile-once.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
import triton


class Config(NamedTuple):
    block_m: int  # rows of the program's tile (queries; keys in the dK pass)
    block_n: int  # rows streamed per step (keys; queries in the dK pass)
    block_d: int  # feature chunk of the logits dot product
    block_dout: int  # cap on the feature columns of a backward program's output
    num_warps: int
    num_stages: int


_Table = Dict[str, List[Tuple[Optional[int], Config]]]

# "half" covers float16 and bfloat16 (same tile footprint); "fp32" float32.
FWD: _Table = {
    "half": [(None, Config(128, 64, 64, 0, 8, 3))],
    "fp32": [(None, Config(64, 64, 32, 0, 4, 2))],
}
BWD_ROWS: _Table = {
    "half": [(None, Config(64, 64, 64, 128, 8, 2))],
    "fp32": [(None, Config(64, 32, 32, 128, 8, 2))],
}
BWD_COLS: _Table = {
    "half": [(None, Config(64, 64, 64, 128, 8, 2))],
    "fp32": [(None, Config(64, 32, 32, 128, 8, 2))],
}
TABLES = {"fwd": FWD, "bwd_rows": BWD_ROWS, "bwd_cols": BWD_COLS}

_override: Dict[str, int] = {}


def _dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def get(kernel: str, dtype: torch.dtype, d: int) -> Config:
    """The config of ``kernel`` ("fwd", "bwd_rows", "bwd_cols") for inputs of ``dtype`` and dimension ``d``."""
    for bound, cfg in TABLES[kernel][_dtype_class(dtype)]:
        if bound is None or d <= bound:
            break
    cfg = cfg._replace(**_override)
    # The output chunk never exceeds D (rounded up to a power of two, and tl.dot's minimum of 16).
    dout = max(16, triton.next_power_of_2(d))
    if cfg.block_dout:
        dout = min(dout, cfg.block_dout)
    return cfg._replace(block_dout=dout)


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
