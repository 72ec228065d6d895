"""Results to files and tables: results.json, results.csv, table.txt (also printed), PNG plots.

The files are written from the records alone, so a table or a plot can be regenerated from a
results.json (``python -m sslkernels.bench --report path/to/results.json``).
"""
from __future__ import annotations

import csv
import json
import math
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

CSV_FIELDS = [
    "op", "size", "dims", "dtype", "device", "impl", "group", "kind", "mode", "status", "reason",
    "median_ms", "p20_ms", "p80_ms", "reps", "setup_s", "peak_mem_bytes", "mem_method", "flops", "bytes",
    "tflops", "gbps", "roofline_frac", "bound", "speedup_vs_eager", "mem_vs_eager", "check_rel_err", "sweep",
    "note", "source",
]


def dims_text(dims: Dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in dims.items())


def write_json(doc: Dict[str, Any], path: Path) -> None:
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None  # JSON has no NaN / Infinity
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    path.write_text(json.dumps(clean(doc), indent=1))


def write_csv(records: List[Dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            row = dict(r)
            row["dims"] = dims_text(r["dims"])
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_FIELDS})


# ------------------------------------------------------------------------------------------ table


def _num(x: Optional[float], fmt: str = "{:.3g}") -> str:
    return "-" if x is None else fmt.format(x)


def _mib(x: Optional[float]) -> str:
    return "-" if x is None else f"{x / 2 ** 20:.3g}"


def _ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _impl_label(r: Dict[str, Any]) -> str:
    return f"{r['impl']} ({r['kind']})" if r["group"] == "ours" and r["impl"] == "ours" else r["impl"]


def _grouped(records):
    cases: "OrderedDict[tuple, List[Dict[str, Any]]]" = OrderedDict()
    for r in records:
        cases.setdefault((r["op"], r["size"], dims_text(r["dims"]), r["dtype"]), []).append(r)
    return cases


_GROUP_ORDER = {"ours": 0, "eager": 1, "compile": 2, "peers": 3}


def detail_table(records: List[Dict[str, Any]]) -> str:
    head = ("mode", "impl", "median ms", "p20-p80 ms", "peak MiB", "TFLOP/s", "GB/s", "roof %", "x eager",
            "mem/eager")
    rows: List[Tuple[str, ...]] = []
    for (op, size, dims, dtype), recs in _grouped(records).items():
        rows.append((f"{op}  {size}  [{dims}]  {dtype}",))
        ran = [r for r in recs if r["status"] in ("ok", "oom", "error")]
        for r in sorted(ran, key=lambda r: (("fwd", "bwd", "fwd+bwd").index(r["mode"]),
                                            _GROUP_ORDER.get(r["group"], 9), r["impl"])):
            if r["status"] != "ok":
                rows.append((r["mode"], _impl_label(r), r["status"].upper(), r["reason"][:60]))
                continue
            spread = (f"{r['p20_ms']:.3g}-{r['p80_ms']:.3g}" if r["p20_ms"] is not None
                      else "derived" if r["reason"].startswith("bwd =") else "-")
            frac = None if r.get("roofline_frac") is None else 100 * r["roofline_frac"]
            rows.append((r["mode"], _impl_label(r), _num(r["median_ms"]), spread, _mib(r["peak_mem_bytes"]),
                         _num(r.get("tflops")), _num(r.get("gbps")), _num(frac, "{:.2g}"),
                         _ratio(r.get("speedup_vs_eager")), _ratio(r.get("mem_vs_eager"))))
    return _render(head, rows)


def summary_table(records: List[Dict[str, Any]]) -> str:
    """One line per case: ours against eager / compile / each peer, in the mode a training step pays."""
    from .cases import SPECS

    others: List[str] = []
    for r in records:
        if r["impl"] != "ours" and r["impl"] not in others:
            others.append(r["impl"])
    order = {"ours": 0, "eager": 1, "compile": 2}
    others.sort(key=lambda n: (order.get(n.split(":")[0], 3), n))
    head = ("op", "size", "dtype", "mode", "ours", "ours ms") + tuple(f"vs {o}" for o in others)
    rows = []
    for (op, size, dims, dtype), recs in _grouped(records).items():
        mode = SPECS[op].primary_mode
        by = {r["impl"]: r for r in recs if r["mode"] == mode}
        ours = by.get("ours")
        if ours is None or ours["status"] != "ok":
            # Where "ours" is the eager reference (no fused path on this device), show the best other kind.
            cands = [r for r in recs if r["mode"] == mode and r["group"] == "ours" and r["status"] == "ok"]
            ours = min(cands, key=lambda r: r["median_ms"]) if cands else None
        if ours is None:
            why = by.get("ours", {}).get("reason") or "not run"
            label = "= eager (no fused path)" if "eager reference" in why else why[:40]
            rows.append((op, size, dtype, mode, label, "-", *(["-"] * len(others))))
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
        rows.append((op, size, dtype, mode, f"{ours['impl']} ({ours['kind']})", _num(ours["median_ms"]), *cells))
    # Columns of implementations that never ran (their reasons are listed under "Not run") only add width.
    keep = [i for i in range(len(head)) if i < 6 or any(row[i] != "-" for row in rows)]
    return _render(tuple(head[i] for i in keep), [tuple(row[i] for i in keep) for row in rows])


def skipped_table(records: List[Dict[str, Any]]) -> str:
    why: "OrderedDict[Tuple[str, str], List[str]]" = OrderedDict()
    for r in records:
        if r["status"] == "skipped":
            ops = why.setdefault((r["impl"], r["reason"]), [])
            if r["op"] not in ops:
                ops.append(r["op"])
    return "\n".join(f"  {impl}: {reason}  [{', '.join(ops)}]" for (impl, reason), ops in why.items())


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


def text_report(doc: Dict[str, Any]) -> str:
    env, roof, records = doc["environment"], doc["roofline"], doc["results"]
    parts = [
        f"sslkernels benchmark: {env['device_name']} ({env['device']}), torch {env['torch']}, "
        f"triton {env.get('triton')}, {doc['config']['dtype']}, {env.get('torch_threads')} threads",
        f"roofline (measured in this run): matmul {roof['matmul_tflops']:.3g} TFLOP/s ({roof['matmul_note']}, "
        f"n={roof['matmul_n']}), copy {roof['copy_gbps']:.3g} GB/s ({roof['copy_bytes'] >> 20} MiB)",
        "times: median over repeats (p20-p80 spread); peak MiB: extra memory of one call; "
        "x eager: eager time / this time (>1 is faster); mem/eager: this peak / eager peak",
        "roof %: roofline time / measured time; above 100 in fwd or bwd means the implementation does that "
        "work in the other pass (e.g. gradients during the forward): compare fwd+bwd",
        "",
        "Summary: ours against the others (training step: fwd+bwd for losses). "
        "Each cell: other time / ours time (>1: ours faster) / other peak memory / ours peak",
        summary_table(records),
        "",
        "Details",
        detail_table(records),
    ]
    skipped = skipped_table(records)
    if skipped:
        parts += ["", "Not run (reason) [ops]", skipped]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------ plots


def write_plots(doc: Dict[str, Any], out_dir: Path) -> Tuple[List[Path], Optional[str]]:
    """PNG plots when matplotlib is importable; returns (files, why not)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed: no plots (pip install matplotlib)"
    records = doc["results"]
    files = []
    if any(r.get("sweep") for r in records):
        files.append(_plot_sweep(plt, records, out_dir / "sweep.png"))
    else:
        files.append(_plot_speedup(plt, records, out_dir / "speedup.png"))
    return [f for f in files if f is not None], None


def _plot_speedup(plt, records, path: Path) -> Optional[Path]:
    from .cases import SPECS

    rows = [r for r in records if r["status"] == "ok" and r.get("speedup_vs_eager") and r["group"] != "eager"
            and r["mode"] == SPECS[r["op"]].primary_mode]
    if not rows:
        return None
    labels = [f"{r['op']} {r['size']} · {r['impl']}" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(rows) + 1.5))
    ax.barh(range(len(rows)), [r["speedup_vs_eager"] for r in rows],
            color=["C0" if r["group"] == "ours" else "C1" if r["group"] == "compile" else "C2" for r in rows])
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(_ratio_formatter())
    ax.xaxis.set_minor_formatter(_ratio_formatter(minor=True))
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("speed-up over eager (training-step mode), log scale")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _ratio_formatter(minor: bool = False):
    from matplotlib.ticker import FuncFormatter

    # Label 0.5x, 1x, 2x, 5x ...; leave the other minor ticks bare so labels do not collide.
    def fmt(v, _pos):
        lead = v / 10 ** math.floor(math.log10(v)) if v > 0 else 0
        if minor and round(lead) not in (2, 5):
            return ""
        return f"{v:g}x"
    return FuncFormatter(fmt)


def _plot_sweep(plt, records, path: Path) -> Optional[Path]:
    ops = list(OrderedDict.fromkeys(r["op"] for r in records if r.get("sweep")))
    if not ops:
        return None
    fig, axes = plt.subplots(2, len(ops), figsize=(4.2 * len(ops), 7), squeeze=False)
    for j, op in enumerate(ops):
        recs = [r for r in records if r["op"] == op and r.get("sweep")]
        dim = recs[0]["sweep"]
        series = defaultdict(list)
        for r in recs:
            series[r["impl"]].append(r)
        for impl, rs in series.items():
            ok = [r for r in rs if r["status"] == "ok"]
            x = [r["dims"][dim] for r in ok]
            axes[0][j].plot(x, [r["median_ms"] for r in ok], marker="o", label=impl)
            mem = [(r["dims"][dim], r["peak_mem_bytes"] / 2 ** 20) for r in ok if r["peak_mem_bytes"]]
            if mem:
                axes[1][j].plot(*zip(*mem), marker="o", label=impl)
            for r in rs:
                if r["status"] == "oom":
                    axes[0][j].axvline(r["dims"][dim], ls=":", color="r", lw=0.8)
                    axes[0][j].annotate(f"{impl} OOM", (r["dims"][dim], 1), xycoords=("data", "axes fraction"),
                                        rotation=90, fontsize=7, va="top")
        for i, ylabel in enumerate(("median ms", "peak MiB")):
            ax = axes[i][j]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(dim)
            ax.set_ylabel(ylabel)
            ax.set_title(op if i == 0 else "")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
    files = [out_dir / "results.json", out_dir / "results.csv", out_dir / "table.txt", *plots]
    return {"files": files, "text": text, "plots_note": why}
