"""One report from several runs of the suite on the same device (``python -m sslkernels.bench --merge``).

The full GPU preset takes longer than one command may run on a lent GPU (10 minutes), so it runs in parts
(op groups, each with its own ``--out``) and the parts' results.json are merged into one results.json,
tables, Markdown and plots. Every record keeps the ratios of its own run (speedups against the eager
reference and roofline fractions are measured side by side within a run, never across runs); the targets
are evaluated again over the merged records, and a target whose two sides come from different runs says
so. The merged document lists its parts (file, git commit, time, wall time, roofline) under
``merged_from``; a part that is itself a merge (or a ``--resume``d run) contributes its own parts, so
every record's ``run`` indexes the run that measured it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

from . import targets as _targets


def _key(r: Dict[str, Any]) -> tuple:
    return (r["op"], r["size"], json.dumps(r["dims"], sort_keys=True), r["dtype"], r["impl"], r["mode"])


def _union(lists) -> list:
    out: list = []
    for xs in lists:
        for x in xs or ():
            if x not in out:
                out.append(x)
    return out


def merge(docs: Sequence[Dict[str, Any]], names: Sequence[str]) -> Dict[str, Any]:
    """The documents of several runs as one; a case measured twice keeps the later run's records."""
    if not docs:
        raise ValueError("--merge needs at least one results.json")
    devices = {(d["environment"]["device_name"], d["config"]["device"].split(":")[0]) for d in docs}
    if len(devices) != 1:
        raise ValueError(f"--merge: the runs were measured on different devices {sorted(devices)}; "
                         "ratios and rooflines are only comparable on one")
    if any(d.get("benchmark") == "distributed" for d in docs):
        raise ValueError("--merge takes per-op runs, not --distributed ones")
    records: Dict[tuple, Dict[str, Any]] = {}
    parts: List[Dict[str, Any]] = []
    for name, d in zip(names, docs):
        base = len(parts)
        parts.extend(_parts(d, name))
        for r in d["results"]:
            # which part measured it (an index into merged_from); a merged part's records keep theirs
            records[_key(r)] = dict(r, run=base + (r.get("run", 0) if d.get("merged_from") else 0))
    first = docs[0]
    cfgs = [d["config"] for d in docs]
    doc = {
        "environment": first["environment"],
        "roofline": first["roofline"],
        "config": {
            **first["config"],
            "ops": _union(c.get("ops") for c in cfgs),
            "sizes": _union(c.get("sizes") for c in cfgs),
            "dtype": ",".join(_union(str(c.get("dtype", "")).split(",") for c in cfgs)),
            "impls": _union(c.get("impls") for c in cfgs),
            "quick": any(c.get("quick") for c in cfgs),
        },
        "formulas": {k: v for d in docs for k, v in d.get("formulas", {}).items()},
        "wall_s": sum(d.get("wall_s") or 0.0 for d in docs),
        "results": list(records.values()),
        "merged_from": parts,
    }
    doc["targets"] = _targets.evaluate(doc)
    for t in doc["targets"]:
        if not t["vs"]:
            continue
        op, label, impl = t["vs"].split("/")
        mine = _targets._find(doc["results"], t["op"], t["size"], t["dtype"], "ours", t["mode"])
        ref = _targets._find(doc["results"], op, label, t["dtype"], impl, t["mode"])
        if mine and ref and mine["run"] != ref["run"]:
            t["why"] = ((t.get("why") or "") + " (its two sides come from different runs of the merge)").strip()
    return doc


def _parts(doc: Dict[str, Any], name: str) -> List[Dict[str, Any]]:
    """What ``merged_from`` says of one input: its own parts if it is a merge, else the run itself."""
    if doc.get("merged_from"):
        return [dict(p) for p in doc["merged_from"]]
    env = doc["environment"]
    return [{"file": name, "git_commit": env.get("git_commit"), "timestamp": env.get("timestamp"),
             "wall_s": doc.get("wall_s"), "roofline": doc["roofline"], "ops": doc["config"].get("ops")}]


def load_and_merge(paths: Sequence[str]) -> Dict[str, Any]:
    docs: List[Dict[str, Any]] = [json.loads(Path(p).read_text()) for p in paths]
    return merge(docs, [str(p) for p in paths])
