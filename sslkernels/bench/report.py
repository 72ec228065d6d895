"""Results to files and tables: results.json, results.csv, table.txt (also printed), results.md, PNG plots.

The files are written from the records alone, so a table or a plot can be regenerated from a
results.json (``python -m sslkernels.bench --report path/to/results.json [--out DIR]``).

Plots (each panel one op, implementations in fixed colours across panels, log axes):
  time.png       median time per implementation and size, in the mode a training step pays
  memory.png     peak extra memory of the same calls (allocator peak; CPU RSS growth is in the tables)
  speedup.png    eager time / this time, where the case ran the eager reference
  roofline.png   roofline time / measured time: the fraction of the device's measured ceiling reached
  sweep_time.png, sweep_memory.png   time and memory against the swept dim (``--sweep N``), with the
                 size where each implementation ran out of memory or was stopped marked × (CPU: the
                 worker's RSS growth dashed next to the allocator peak)
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

CSV_FIELDS = [
    "op", "size", "dims", "dtype", "device", "impl", "group", "kind", "mode", "status", "reason",
    "median_ms", "p20_ms", "p80_ms", "reps", "setup_s", "peak_mem_bytes", "mem_method", "rss_growth_bytes",
    "rss_method", "flops", "bytes",
    "tflops", "gbps", "roofline_frac", "bound", "speedup_vs_eager", "mem_vs_eager", "check_rel_err", "sweep",
    "note", "source",
]


def dims_text(dims: Dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in dims.items())


def write_json(doc: Dict[str, Any], path: Path) -> None:
    """``doc`` as JSON at ``path``, replaced atomically: a run killed mid-write leaves the last whole file (a lent
    GPU's command limit can fall on the final write, and a part resumes from that file)."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None  # JSON has no NaN / Infinity
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(clean(doc), indent=1))
    os.replace(tmp, path)


def write_csv(records: List[Dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            row = dict(r)
            row["dims"] = dims_text(r["dims"])
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_FIELDS})


# ------------------------------------------------------------------------------------------ table

MODES = ("fwd", "bwd", "fwd+bwd")
_GROUP_ORDER = {"ours": 0, "eager": 1, "compile": 2, "baselines": 3, "peers": 4}

Table = Tuple[Tuple[str, ...], List[Tuple[str, ...]]]


def _g(x: float) -> str:
    """3 significant digits, but never an exponent for numbers people read as counts (7570 ms, 1024 MiB)."""
    return f"{x:.0f}" if 1e3 <= abs(x) < 1e7 else f"{x:.3g}"


def _num(x: Optional[float], fmt: str = "{:.3g}") -> str:
    if x is None:
        return "-"
    return _g(x) if fmt == "{:.3g}" else fmt.format(x)


def _mib(x: Optional[float]) -> str:
    return "-" if x is None else _g(x / 2 ** 20)


def _ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _impl_label(r: Dict[str, Any]) -> str:
    return f"{r['impl']} ({r['kind']})" if r["group"] == "ours" and r["impl"] == "ours" else r["impl"]


def _grouped(records):
    cases: "OrderedDict[tuple, List[Dict[str, Any]]]" = OrderedDict()
    for r in records:
        cases.setdefault((r["op"], r["size"], dims_text(r["dims"]), r["dtype"]), []).append(r)
    return cases


def _primary(op: str) -> str:
    from .cases import SPECS

    return SPECS[op].primary_mode


DETAIL_HEAD = ("mode", "impl", "median ms", "p20-p80 ms", "peak MiB", "TFLOP/s", "GB/s", "roof %", "x eager",
               "mem/eager")
RSS_HEAD = "RSS MiB"


def _has_rss(records: List[Dict[str, Any]]) -> bool:
    return any(r.get("rss_growth_bytes") is not None for r in records)


def detail_head(records: List[Dict[str, Any]]) -> Tuple[str, ...]:
    """DETAIL_HEAD, with the worker's RSS growth after the peak where the run measured it (CPU)."""
    return DETAIL_HEAD[:5] + (RSS_HEAD,) + DETAIL_HEAD[5:] if _has_rss(records) else DETAIL_HEAD


def detail_sections(records: List[Dict[str, Any]]) -> List[Tuple[str, List[Tuple[str, ...]]]]:
    """(case title, rows under detail_head(records)) per case."""
    rss = _has_rss(records)
    out = []
    for (op, size, dims, dtype), recs in _grouped(records).items():
        rows: List[Tuple[str, ...]] = []
        ran = [r for r in recs if r["status"] in ("ok", "oom", "error")]
        for r in sorted(ran, key=lambda r: (MODES.index(r["mode"]), _GROUP_ORDER.get(r["group"], 9), r["impl"])):
            if r["status"] != "ok":
                rows.append((r["mode"], _impl_label(r), r["status"].upper(), r["reason"][:60],
                             *([""] * (7 if rss else 6))))
                continue
            spread = (f"{r['p20_ms']:.3g}-{r['p80_ms']:.3g}" if r["p20_ms"] is not None
                      else "derived" if r["reason"].startswith("bwd =") else "-")
            frac = None if r.get("roofline_frac") is None else 100 * r["roofline_frac"]
            rows.append((r["mode"], _impl_label(r), _num(r["median_ms"]), spread, _mib(r["peak_mem_bytes"]),
                         *((_mib(r.get("rss_growth_bytes")),) if rss else ()), _num(r.get("tflops")), _num(r.get("gbps")), _num(frac, "{:.3g}"),
                         _ratio(r.get("speedup_vs_eager")), _ratio(r.get("mem_vs_eager"))))
        out.append((f"{op}  {size}  [{dims}]  {dtype}", rows))
    return out


def detail_table(records: List[Dict[str, Any]]) -> str:
    rows: List[Tuple[str, ...]] = []
    for title, section in detail_sections(records):
        rows.append((title,))
        rows.extend(section)
    return _render(detail_head(records), rows)


def summary_rows(records: List[Dict[str, Any]]) -> Table:
    """One line per case: ours against every other implementation, in the mode a training step pays."""
    others: List[str] = []
    for r in records:
        if r["impl"] != "ours" and r["impl"] not in others:
            others.append(r["impl"])
    others.sort(key=lambda n: (_GROUP_ORDER.get(_group_of(records, n), 9), n))
    head = ("op", "size", "dtype", "mode", "ours", "ours ms", "ours MiB") + tuple(f"vs {o}" for o in others)
    rows = []
    for (op, size, dims, dtype), recs in _grouped(records).items():
        mode = _primary(op)
        if not any(r["mode"] == mode for r in recs):  # a --modes run without the training-step mode
            mode = recs[0]["mode"]
        by = {r["impl"]: r for r in recs if r["mode"] == mode}
        ours = by.get("ours")
        if ours is None or ours["status"] != "ok":
            # Where "ours" is the eager reference (no fused path on this device), show the best other kind.
            cands = [r for r in recs if r["mode"] == mode and r["group"] == "ours" and r["status"] == "ok"]
            ours = min(cands, key=lambda r: r["median_ms"]) if cands else None
        if ours is None:
            why = by.get("ours", {}).get("reason") or "not run"
            label = ("PENDING (--resume runs it)" if by.get("ours", {}).get("pending") else
                     "= eager (no fused path)" if "eager reference" in why else why[:40])
            rows.append((op, size, dtype, mode, label, "-", "-", *(["-"] * len(others))))
            continue
        cells = []
        for o in others:
            r = by.get(o)
            if r is None or r["status"] == "skipped":
                cells.append("-")
            elif r["status"] != "ok":
                cells.append(r["status"].upper())
            else:
                speed = r["median_ms"] / ours["median_ms"]
                mem = (r["peak_mem_bytes"] / ours["peak_mem_bytes"]
                       if r["peak_mem_bytes"] is not None and ours["peak_mem_bytes"] else None)
                cells.append(f"{speed:.2f}x" + (f" / {mem:.2g}x mem" if mem is not None else ""))
        rows.append((op, size, dtype, mode, f"{ours['impl']} ({ours['kind']})", _num(ours["median_ms"]),
                     _mib(ours["peak_mem_bytes"]), *cells))
    # Columns of implementations that never ran (their reasons are listed under "Not run") only add width.
    keep = [i for i in range(len(head)) if i < 7 or any(row[i] != "-" for row in rows)]
    return tuple(head[i] for i in keep), [tuple(row[i] for i in keep) for row in rows]


def summary_table(records: List[Dict[str, Any]]) -> str:
    return _render(*summary_rows(records))


def _group_of(records, impl: str) -> str:
    for r in records:
        if r["impl"] == impl:
            return r["group"]
    return "peers"


def target_rows(doc: Dict[str, Any]) -> Table:
    head = ("issue", "target", "measured", "limit", "", "ours ms", "ref ms", "ours MiB", "ref MiB", "ref")
    rows = []
    for t in doc.get("targets", []):
        unit = "x" if t["metric"] in ("time_ratio", "speedup", "mem_ratio", "floor_ratio") else ""
        if t["metric"] in ("matmul_frac", "bw_frac"):
            value = _num(None if t["value"] is None else 100 * t["value"], "{:.3g}%")
            limit = f"{t['cmp']} {100 * t['limit']:g}%"
        elif t["metric"] == "extra_mem":
            value, limit = _num(t["value"], "{:.3g} MB"), f"{t['cmp']} {t['limit']:g} MB"
        elif t["metric"] == "runs":
            value, limit = ("-" if t["value"] is None else "yes" if t["value"] else "no"), "runs"
        else:
            value, limit = _num(t["value"], "{:.3g}" + unit), f"{t['cmp']} {t['limit']:g}{unit}"
        verdict = t["verdict"] if t["verdict"] != "-" else f"- ({t['why'][:50]})"
        rows.append((t["issue"], t["target"], value, limit, verdict, _num(t["ms"]), _num(t["vs_ms"]),
                     _mib(t["peak_mem_bytes"]), _mib(t["vs_peak_mem_bytes"]), t["vs"] or "measured ceiling"))
    return head, rows


def skipped_lines(records: List[Dict[str, Any]]) -> List[str]:
    why: "OrderedDict[Tuple[str, str], List[str]]" = OrderedDict()
    for r in records:
        if r["status"] == "skipped":
            ops = why.setdefault(("every implementation" if r.get("pending") else r["impl"], r["reason"]), [])
            if r["op"] not in ops:
                ops.append(r["op"])
    return [f"{impl}: {reason}  [{', '.join(ops)}]" for (impl, reason), ops in why.items()]


def _render(head: Tuple[str, ...], rows: List[Tuple[str, ...]]) -> str:
    width = [len(h) for h in head]
    for row in rows:
        if len(row) == len(head):
            width = [max(w, len(c)) for w, c in zip(width, row)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, width)).rstrip()]
    lines.append("  ".join("-" * w for w in width))
    for row in rows:
        if len(row) == 1:
            lines.append(row[0])
        else:
            cells = list(row) + [""] * (len(width) - len(row))
            lines.append("  ".join(c.ljust(w) for c, w in zip(cells, width)).rstrip())
    return "\n".join(lines)


def _md_table(head: Tuple[str, ...], rows: List[Tuple[str, ...]]) -> str:
    def cell(c: str) -> str:
        return c.replace("|", "\\|") or " "
    lines = ["| " + " | ".join(cell(h) for h in head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _header_lines(doc: Dict[str, Any]) -> List[str]:
    env, roof = doc["environment"], doc["roofline"]
    threads = env.get("torch_threads")
    rss_res = env.get("rss_resolution_bytes")
    matmul = ", ".join(f"{v['matmul_tflops']:.3g} TFLOP/s {k}" for k, v in roof.get("by_dtype", {}).items()) \
        or f"{roof['matmul_tflops']:.3g} TFLOP/s"
    return [
        f"device: {env['device_name']} ({env['device']}{f', {threads} threads' if env['device'] == 'cpu' else ''}); "
        f"torch {env['torch']}, triton {env.get('triton')}, sslkernels {env.get('sslkernels')} "
        f"(git {env.get('git_commit') or '?'}), {env.get('timestamp', '')}",
        f"roofline measured in this run: matmul {matmul} ({roof['matmul_note']}, n={roof['matmul_n']}); "
        f"copy {roof['copy_gbps']:.3g} GB/s ({roof['copy_bytes'] >> 20} MiB)"
        + (f"; RSS resolution {_g(rss_res / 2 ** 20)} MiB ({env.get('cpu_count')} CPUs)" if rss_res else ""),
        *_incomplete_lines(doc),
    ]


def _incomplete_lines(doc: Dict[str, Any]) -> List[str]:
    """What a run cut short (time budget, or killed) left for a --resume, and how many runs a report joins."""
    lines = []
    pending = {(r["op"], r["size"], dims_text(r["dims"]), r["dtype"]) for r in doc["results"] if r.get("pending")}
    if pending:
        lines.append(f"INCOMPLETE: {len(pending)} cases not run yet (the run stopped before them): "
                     "repeat its command with --resume <this results.json>")
    if len(doc.get("merged_from") or ()) > 1:
        lines.append(f"joined from {len(doc['merged_from'])} runs on this device (merged_from in results.json); "
                     "ratios and roofline fractions are each measured within one run")
    return lines


LEGEND = [
    "median ms: median over repeats (p20-p80: the spread); peak MiB: extra memory of one call beyond what was "
    "allocated before it (inputs, the gradients the step returns, and for bwd the saved forward graph, are not "
    "counted; GPU: max_memory_allocated; "
    "CPU: peak of torch's CPU allocator from the profiler's allocation events); RSS MiB (CPU): growth of the "
    "resident set in a worker process after a warm-up call (counts everything the process touches, but the "
    "kernel's per-CPU batched counting can hide growth below the resolution in the header)",
    "x eager: eager time / this time (>1: faster); mem/eager: this peak / eager peak; "
    "summary cells: other time / ours time (>1: ours faster) / other peak / ours peak",
    "TFLOP/s and GB/s count the useful work of the op (formulas in results.json), not recomputation; "
    "roof %: roofline time (max of FLOPs / matmul rate, bytes / copy bandwidth) / measured time; above 100 in fwd "
    "or bwd alone means the implementation does that work in the other pass: compare fwd+bwd",
]


def text_report(doc: Dict[str, Any]) -> str:
    records = doc["results"]
    parts = [f"sslkernels benchmark: {doc['environment']['device_name']}", *_header_lines(doc), *LEGEND, ""]
    if doc.get("targets"):
        parts += ["Targets (issues' benchmark targets, ratios measured in this run)", _render(*target_rows(doc)), ""]
    parts += [
        "Summary: ours against the others (training step: fwd+bwd for losses)",
        summary_table(records),
        "",
        "Details",
        detail_table(records),
    ]
    skipped = skipped_lines(records)
    if skipped:
        parts += ["", "Not run (reason) [ops]", *("  " + s for s in skipped)]
    return "\n".join(parts) + "\n"


def markdown_report(doc: Dict[str, Any], plots: List[Path]) -> str:
    records = doc["results"]
    cfg = doc["config"]
    parts = [
        f"# sslkernels benchmark: {doc['environment']['device_name']}",
        "",
        *(f"- {line}" for line in _header_lines(doc)),
        f"- run: sizes {','.join(cfg['sizes'])}, dtype {cfg['dtype']}, implementations {','.join(cfg['impls'])}"
        + (f", sweep of {cfg['sweep']}" if cfg.get("sweep") else "") + f"; {doc.get('wall_s', 0):.0f} s",
        "",
    ]
    if doc.get("targets"):
        parts += ["## Targets", "", _md_table(*target_rows(doc)), ""]
    parts += ["## Summary", "", "Training-step mode (fwd+bwd for losses). "
              "Each cell: other time / ours time (>1: ours faster) / other peak memory / ours peak.", "",
              _md_table(*summary_rows(records)), ""]
    if plots:
        parts += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    parts += ["## Details", "", *(f"- {line}" for line in LEGEND), ""]
    for title, rows in detail_sections(records):
        parts += [f"### {title}", "", _md_table(detail_head(records), rows), ""]
    skipped = skipped_lines(records)
    if skipped:
        parts += ["## Not run", "", *(f"- {s}" for s in skipped), ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------ plots

_COLORS = ["#1f77b4", "#7f7f7f", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
           "#17becf", "#393b79", "#637939"]


_FIXED_COLORS = {"ours": "#1f77b4", "eager": "#7f7f7f", "compile": "#ff7f0e"}


def _impl_colors(records) -> Dict[str, str]:
    """One colour per implementation for every panel and plot of a run (ours blue, eager grey, compile orange)."""
    names = sorted({r["impl"] for r in records if r["status"] in ("ok", "oom", "error")},
                   key=lambda n: _impl_order(records, n))
    rest = iter(c for c in _COLORS if c not in _FIXED_COLORS.values())
    out = {}
    for n in names:
        out[n] = _FIXED_COLORS.get(n) or next(rest, "#333333")
    return out


def _impl_order(records, name: str) -> Tuple[int, str]:
    return (_GROUP_ORDER.get(_group_of(records, name), 9), name)


def write_plots(doc: Dict[str, Any], out_dir: Path) -> Tuple[List[Path], Optional[str]]:
    """PNG plots when matplotlib is importable; returns (files, why not)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed: no plots (pip install matplotlib)"
    records = doc["results"]
    colors = _impl_colors(records)
    files: List[Optional[Path]] = []
    swept = [r for r in records if r.get("sweep")]
    if swept:
        files.append(_plot_sweep(plt, swept, colors, "time", out_dir / "sweep_time.png"))
        files.append(_plot_sweep(plt, swept, colors, "memory", out_dir / "sweep_memory.png"))
    flat = [r for r in records if not r.get("sweep")]
    if flat:
        prim = [r for r in flat if r["status"] == "ok" and r["mode"] == _primary(r["op"])]
        files.append(_bar_grid(plt, prim, colors, lambda r: r["median_ms"], "median time, ms (log)",
                               "{:.3g} ms", out_dir / "time.png", "Time per call (training-step mode)"))
        files.append(_bar_grid(plt, prim, colors, _mem_value, "peak extra memory, MiB (log)", "{:.3g} MiB",
                               out_dir / "memory.png", "Peak extra memory per call (training-step mode)"))
        files.append(_bar_grid(plt, [r for r in prim if r["group"] != "eager"], colors,
                               lambda r: r.get("speedup_vs_eager"), "eager time / this time (log; >1: faster)",
                               "{:.2g}x", out_dir / "speedup.png", "Speed-up over the eager reference", ref=1.0,
                               unit="x"))
        files.append(_bar_grid(plt, prim, colors,
                               lambda r: 100 * r["roofline_frac"] if r.get("roofline_frac") else None,
                               "% of the roofline measured in this run (log)", "{:.3g}%", out_dir / "roofline.png",
                               "Roofline fraction (max of compute and memory bound) / measured time", ref=100.0,
                               unit="%"))
    plt.close("all")
    return [f for f in files if f is not None], None


def _mem_value(r: Dict[str, Any]):
    b = r["peak_mem_bytes"]
    if b is None:
        return None
    # No measurable growth (CPU: under one 4 KiB page): drawn at 4 KiB so it shows on a log axis.
    return (max(b, 4096) / 2 ** 20, "0" if b == 0 else f"{_g(b / 2 ** 20)} MiB")


def _log_ticks(axis, unit: str = "") -> None:
    """Ticks at 1, 2, 5 × powers of ten labelled as plain numbers (0.5x, 20 ms), not 10^k."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=30))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}{unit}"))
    axis.set_minor_formatter(NullFormatter())


def _bar_grid(plt, rows, colors, value, xlabel: str, fmt: str, path: Path, title: str,
              ref: Optional[float] = None, unit: str = "") -> Optional[Path]:
    """One panel per op; a bar per (size, implementation); log x.

    ``value(record)`` is a number, (number, label), or None (drawn as "n/a": it ran, the metric was not
    measured, e.g. CPU memory of torch.compile).
    """
    panels: "OrderedDict[str, List[Tuple[str, Optional[float], str, str]]]" = OrderedDict()
    ordered = sorted(rows, key=lambda r: (list(OrderedDict.fromkeys(x["op"] for x in rows)).index(r["op"]),
                                          list(OrderedDict.fromkeys(x["size"] for x in rows)).index(r["size"]),
                                          _impl_order(rows, r["impl"])))
    for r in ordered:
        v = value(r)
        v, text = v if isinstance(v, tuple) else (v, None if v is None else
                                                  fmt.replace("{:.3g}", _g(v)) if "{:.3g}" in fmt else fmt.format(v))
        if v is not None and (not math.isfinite(v) or v <= 0):
            v, text = None, None
        sizes = list(OrderedDict.fromkeys(x["size"] for x in rows if x["op"] == r["op"]))
        label = r["impl"] if len(sizes) == 1 else f"{r['size']} · {r['impl']}"
        key = f"{r['op']}  [{r['size']}]" if len(sizes) == 1 else r["op"]
        panels.setdefault(key, []).append((label, v, r["impl"], text or "n/a"))
    panels = OrderedDict((k, b) for k, b in panels.items() if any(v is not None for _, v, _, _ in b))
    if not panels:
        return None
    n = len(panels)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    heights = [0.3 * max(len(b) for b in list(panels.values())[i * ncols:(i + 1) * ncols]) + 1.0 for i in range(nrows)]
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.6 * ncols, sum(heights) + 0.7), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for k, (name, bars) in enumerate(panels.items()):
        ax = axes[k // ncols][k % ncols]
        vals = [v for _, v, _, _ in bars if v is not None]
        # Each panel on its own range (ops differ by orders of magnitude), with room for the labels.
        plo, phi = min(vals), max(vals)
        if ref is not None:
            plo, phi = min(plo, ref), max(phi, ref)
            ax.axvline(ref, color="k", lw=0.8, ls="--")
        left = plo / 2.5
        y = list(range(len(bars)))
        ax.barh(y, [v if v is not None else 0 for _, v, _, _ in bars], left=None,
                color=[colors.get(i, "C0") for _, _, i, _ in bars], height=0.7)
        ax.set_xscale("log")
        _log_ticks(ax.xaxis, unit)
        ax.set_xlim(left, phi * 6)
        for yi, (_, v, _, text) in zip(y, bars):
            ax.text((v if v is not None else left) * 1.08, yi, text, va="center", fontsize=7,
                    color="k" if v is not None else "#888888")
        ax.set_yticks(y)
        ax.set_yticklabels([lbl for lbl, _, _, _ in bars], fontsize=8)
        ax.set_ylim(len(bars) - 0.4, -0.6)
        ax.set_title(name, fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", which="major", alpha=0.3)
        if k + ncols >= n:
            ax.set_xlabel(xlabel, fontsize=8)
    for k in range(n, nrows * ncols):
        axes[k // ncols][k % ncols].axis("off")
    fig.suptitle(title, fontsize=11, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.2 / (sum(heights) + 0.7)))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_sweep(plt, records, colors, what: str, path: Path) -> Optional[Path]:
    from matplotlib.ticker import FuncFormatter

    keys = list(OrderedDict.fromkeys((r["op"], r["mode"], r["dtype"]) for r in records))
    n = len(keys)
    ncols = min(2, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 4.6 * nrows), squeeze=False)
    drew = False
    for k, (op, mode, dtype) in enumerate(keys):
        ax = axes[k // ncols][k % ncols]
        recs = [r for r in records if (r["op"], r["mode"], r["dtype"]) == (op, mode, dtype)]
        dim = recs[0]["sweep"]
        dims = recs[0]["dims"]
        fixed = " ".join(f"{d}={v}" for d, v in dims.items() if d != dim and v != dims[dim])  # ties follow the dim
        series: "OrderedDict[str, List[Dict[str, Any]]]" = OrderedDict()
        for r in recs:
            series.setdefault(r["impl"], []).append(r)
        for impl, rs in series.items():
            pts = []
            for r in rs:
                if r["status"] != "ok":
                    continue
                v = r["median_ms"] if what == "time" else (
                    _mem_value(r)[0] if r["peak_mem_bytes"] is not None else None)
                if v:
                    pts.append((r["dims"][dim], v))
            if not pts:
                continue
            drew = True
            ax.plot(*zip(*pts), marker="o", ms=4, color=colors.get(impl), label=impl)
            rss = [(r["dims"][dim], max(r["rss_growth_bytes"], 4096) / 2 ** 20) for r in rs
                   if what == "memory" and r["status"] == "ok" and r.get("rss_growth_bytes") is not None]
            if rss:  # CPU: the worker's RSS growth of the same calls, dashed
                ax.plot(*zip(*rss), marker=".", ms=3, ls="--", lw=0.9, color=colors.get(impl),
                        label=f"{impl} (RSS growth)")
            failed = [r for r in rs if r["status"] in ("oom", "error")]
            stop = [r for r in rs if r["status"] == "skipped" and r["reason"].startswith("stopped")]
            if stop and not failed:
                why = stop[0]["reason"].replace("stopped: ", "").replace(" at a smaller size", "")
                ax.annotate(f"{impl}: stopped ({why})", pts[-1], fontsize=7, xytext=(6, -3),
                            textcoords="offset points", color=colors.get(impl))
            if failed:
                x = failed[0]["dims"][dim]
                ax.plot([x], [pts[-1][1]], marker="x", ms=9, mew=2, color=colors.get(impl), ls="none")
                ax.annotate(f"{impl}: {failed[0]['status'].upper()} at {dim}={x}", (x, pts[-1][1]), fontsize=7,
                            xytext=(4, 4), textcoords="offset points", color=colors.get(impl))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _log_ticks(ax.yaxis)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
        ax.set_xlabel(dim)
        ax.set_ylabel("median time, ms" if what == "time" else "peak extra memory, MiB (log)")
        ax.set_title(f"{'Time' if what == 'time' else 'Peak extra memory'} against {dim}: {op} {mode} {dtype}"
                     f"  ({fixed})", fontsize=9, loc="left")
        ax.grid(which="major", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a panel with nothing measured (e.g. --no-memory) has no legend
            ax.legend(fontsize=8)
    for k in range(n, nrows * ncols):
        axes[k // ncols][k % ncols].axis("off")
    if not drew:
        plt.close(fig)
        return None
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(doc: Dict[str, Any], out_dir: Path) -> Dict[str, Any]:
    """Write every output file; returns {"files": [...], "text": table, "plots_note": ...}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = text_report(doc)
    write_json(doc, out_dir / "results.json")
    write_csv(doc["results"], out_dir / "results.csv")
    (out_dir / "table.txt").write_text(text)
    plots, why = write_plots(doc, out_dir)
    (out_dir / "results.md").write_text(markdown_report(doc, plots))
    files = [out_dir / "results.json", out_dir / "results.csv", out_dir / "table.txt", out_dir / "results.md", *plots]
    return {"files": files, "text": text, "plots_note": why}
