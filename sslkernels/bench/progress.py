"""Progress on stderr: a tqdm bar when stderr is a terminal, plain log lines always.

The log lines (one per implementation × case) are the record of a run in CI logs; the bar only
says how far a long run (a sweep, the paper preset) has come. Lines are written through the bar so
they do not tear it.
"""
from __future__ import annotations

import sys
from typing import Optional


class Progress:
    def __init__(self, total: int, desc: str, enabled: Optional[bool] = None, unit: str = "run"):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self._bar = None
        if enabled and total > 0:
            try:
                from tqdm import tqdm
            except ImportError:  # the bar is a nicety; the log lines carry the information
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                                 leave=False)

    def log(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def update(self, n: int = 1, postfix: str = "") -> None:
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
