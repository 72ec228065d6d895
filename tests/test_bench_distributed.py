"""The distributed benchmark (``python -m sslkernels.bench --distributed``, sslkernels/bench/distributed.py):
end to end on real gloo ranks at a tiny size, and the pieces that decide a case's status across ranks."""
import importlib.util
import json
import math

import pytest

from sslkernels.bench import distributed
from sslkernels.bench.__main__ import main

from gloo_ranks import skip_without_gloo

CLIP_IMPLS = ["ours ring", "ours all-gather", "open_clip", "eager all-gather"]
# OpenCLIP is the peer; where it is not installed (a GPU image without the carried wheels) its rows say so.
HAVE_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None
GATHERING = ["ours all-gather", "eager all-gather"] + (["open_clip"] if HAVE_OPEN_CLIP else [])


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    """One run: clip_loss, every implementation, worlds 1 and 2, N=16 rows per rank (about 30 s on 2 cores)."""
    skip_without_gloo()
    out = tmp_path_factory.mktemp("dist")
    rc = main(["--distributed", "clip_loss", "--worlds", "1,2", "--sizes", "N=16:D=8", "--repeats", "2",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    return out, json.loads((out / "results.json").read_text())


def test_every_case_is_measured_or_says_why(clip_run):
    out, doc = clip_run
    assert doc["benchmark"] == "distributed"
    assert doc["config"]["worlds"] == [1, 2] and doc["config"]["dims"] == {"N": 16, "D": 8}
    assert doc["environment"]["git_commit"] is not None and doc["environment"]["device"] == "cpu"
    got = {(r["impl"], r["world"]): r for r in doc["results"]}
    assert set(got) == {(i, w) for i in CLIP_IMPLS for w in (1, 2)}
    for (impl, world), r in got.items():
        assert r["op"] == "clip_loss" and r["local_dims"] == {"N": 16, "D": 8}
        if r["status"] == "ok":
            assert len(r["peak_mem_bytes_per_rank"]) == world and len(r["times_ms_per_rank"]) == world
            assert r["peak_mem_bytes"] == max(r["peak_mem_bytes_per_rank"]) > 0
            assert r["peak_mem_bytes_rank0"] == r["peak_mem_bytes_per_rank"][0]
            assert all(len(ts) == 2 for ts in r["times_ms_per_rank"]) and r["reps"] == 2
            assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0
            assert r["median_ms"] >= r["median_ms_rank0"] * 0.999  # each repeat's slowest rank
        elif impl == "open_clip" and not HAVE_OPEN_CLIP:
            assert r["status"] == "skipped" and "open_clip" in r["reason"], r
        else:
            # The ring is being written: until then NotImplementedError, recorded as a skip with its message.
            assert (impl, r["status"]) == ("ours ring", "skipped"), r
            assert r["reason"].startswith("NotImplementedError") and "ring" in r["reason"]
    # World 1 is the single-process loss for every way of ours (a 1-rank group), so the ring runs there today.
    for impl in ["ours ring"] + GATHERING:
        assert got[(impl, 1)]["status"] == "ok", got[(impl, 1)]
        assert got[(impl, 1)]["mem_vs_world1"] == pytest.approx(1.0)
    for impl in GATHERING:
        assert got[(impl, 2)]["status"] == "ok", got[(impl, 2)]


def test_all_gather_memory_grows_with_the_world(clip_run):
    _, doc = clip_run
    got = {(r["impl"], r["world"]): r for r in doc["results"]}
    for impl in GATHERING:
        # Twice the features gathered, and (OpenCLIP, eager) n × 2n logits instead of n × n: well above flat.
        assert got[(impl, 2)]["mem_vs_world1"] > 1.5, (impl, got[(impl, 2)]["mem_vs_world1"])
    if HAVE_OPEN_CLIP:  # OpenCLIP's ClipLoss(local_loss=True, gather_with_grad=True) and the eager baseline agree
        assert got[("open_clip", 2)]["peak_mem_bytes"] == pytest.approx(
            got[("eager all-gather", 2)]["peak_mem_bytes"], rel=0.25)
    [t] = doc["targets"]
    assert t["target"].startswith("clip_loss ours ring") and set(t["compare"]) == {
        "ours all-gather", "open_clip", "eager all-gather"}
    if t["value"] is None:
        assert t["verdict"] == "-" and "NotImplementedError" in t["why"]
    else:
        assert t["verdict"] in ("PASS", "FAIL")


def test_files_and_table(clip_run, capsys):
    out, doc = clip_run
    for name in ("results.json", "table.txt", "results.md", "memory.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.txt").read_text()
    head = next(line for line in table.splitlines() if line.startswith("op "))
    assert head.split() == ["op", "impl", "w1", "MiB/rank", "w1", "ms", "w2", "MiB/rank", "w2", "ms", "growth", "1→2"]
    rows = {tuple(line.split()[:3]): line.split() for line in table.splitlines() if line.startswith("clip_loss ")}
    assert len(rows) == len(CLIP_IMPLS)
    got = {(r["impl"], r["world"]): r for r in doc["results"]}
    eager1, eager2 = got[("eager all-gather", 1)], got[("eager all-gather", 2)]
    cells = rows[("clip_loss", "eager", "all-gather")][3:]
    assert float(cells[0]) == pytest.approx(eager1["peak_mem_bytes"] / 2 ** 20, rel=0.01)
    assert float(cells[2]) == pytest.approx(eager2["peak_mem_bytes"] / 2 ** 20, rel=0.01)
    assert cells[-1] == f"{eager2['mem_vs_world1']:.2f}x"
    if got[("ours ring", 2)]["status"] == "skipped":
        assert rows[("clip_loss", "ours", "ring")][5] == "skip" and "NotImplementedError" in table
    md = (out / "results.md").read_text()
    assert "| op | impl | w1 MiB/rank |" in md and "![memory](memory.png)" in md
    # --report re-renders the same table from results.json alone.
    assert main(["--report", str(out / "results.json")]) == 0
    assert capsys.readouterr().out == table


def test_ranks_agree_on_a_case_status():
    assert distributed._agree([None, None]) is None
    ni = "NotImplementedError: clip_loss: distributed='ring' is not implemented yet"
    assert distributed._agree([ni, ni]) == {"status": "skipped", "reason": ni}
    # One rank failing marks the case on every rank, and says which rank it was.
    assert distributed._agree([None, "RuntimeError: boom"]) == {"status": "error",
                                                                "reason": "RuntimeError: boom (rank 1 of 2)"}
    assert distributed._agree(["OutOfMemoryError: CUDA out of memory", None, None])["status"] == "oom"


def test_merge_takes_the_largest_peak_and_the_slowest_rank_per_repeat():
    r = distributed.merge([{"status": "ok", "peak_mem_bytes": 100, "times_ms": [1.0, 5.0, 2.0]},
                           {"status": "ok", "peak_mem_bytes": 300, "times_ms": [3.0, 1.0, 2.5]}])
    assert r["peak_mem_bytes"] == 300 and r["peak_mem_bytes_rank0"] == 100
    assert r["median_ms"] == 3.0 and r["median_ms_rank0"] == 2.0 and r["reps"] == 3  # max per repeat: 3, 5, 2.5
    bad = distributed.merge([{"status": "skipped", "reason": "why"}, {"status": "skipped", "reason": "why"}])
    assert bad == {"status": "skipped", "reason": "why"}


def test_cli_rejects_what_it_cannot_run(capsys):
    assert main(["--distributed", "ema_update_"]) == 2
    assert "--distributed measures" in capsys.readouterr().err
    assert main(["--distributed", "--worlds", "0,2"]) == 2
    assert main(["--distributed", "--impl", "lightly"]) == 2
    assert "unknown" in capsys.readouterr().err
    assert main(["--distributed", "--sizes", "M=4"]) == 2
    assert [i.name for i in distributed.select(["clip_loss", "nt_xent"], ["ours"])] == [
        "ours ring", "ours all-gather", "ours ring", "ours all-gather"]
    assert distributed.local_dims("nt_xent", {"N": 16, "D": 8}) == {"N": 8, "D": 8}  # Z = [z1; z2] holds N rows
