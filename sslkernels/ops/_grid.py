"""Launch-grid pieces shared by the Triton kernel families (Triton-only: _common.py serves the CPU paths too).

CUDA caps grid axes 1 and 2 at 65535 programs (axis 0 at 2³¹ − 1), a limit the interpreter does not enforce.
A kernel whose program count along axis 1 grows with a user's size (column tiles of a similarity matrix, tiles
of P) launches ``folded(n0, n1)`` and reads its axis-1 index from ``axis1()``: up to 65535 programs that is the
plain 2-D grid; past it the count is folded over axes 1 and 2. (A flat 1-D grid with a division per program
cost the similarity and Sinkhorn kernels 30–50% more registers on sm_90: half the resident blocks.)
"""
from __future__ import annotations

import triton
import triton.language as tl

MAX_AXIS12 = 65535


def folded(n0: int, n1: int) -> tuple:
    """The grid for n0 × n1 programs with n1 folded over axes 1 and 2. The fold launches fewer than
    n1 / 65535 extra programs along axis 1 (indices ≥ n1): kernels must mask them out, as they mask a ragged
    last tile."""
    n2 = max(1, -(-n1 // MAX_AXIS12))  # n1 = 0 (nothing to launch, as the plain grid had it): no division by 0
    return n0, -(-n1 // n2), n2


@triton.jit
def axis1():
    """This program's index along the folded axis 1 of ``folded``'s grid."""
    return tl.program_id(1) + tl.program_id(2) * tl.num_programs(1)
