"""Smoke tests of the benchmark suite (sslkernels/bench): the CLI end to end on tiny CPU cases,
the case table's coverage of the API, and the pieces that decide what runs."""
import csv
import json
import math

import pytest
import torch

from conftest import load_benchmark_script
from sslkernels import backends
from sslkernels.bench import cases, impls, memory, report, run, targets
from sslkernels.bench.__main__ import main
from sslkernels.bench.timing import Budget

# Every op of shared/API.md (MemoryQueue.enqueue_ included) has a benchmark case.
API_OPS = {
    "info_nce", "nt_xent", "clip_loss", "siglip_loss", "moco_loss", "supcon_loss", "negative_cosine_similarity",
    "dino_loss", "update_center_", "sinkhorn_knopp", "barlow_twins_loss", "vicreg_loss", "ema_update_",
    "MemoryQueue.enqueue_", "similarity", "knn_topk", "rankme",
}


def test_every_api_op_has_a_case_with_all_presets():
    assert set(cases.SPECS) == API_OPS
    for spec in cases.SPECS.values():
        assert set(spec.sizes) == set(cases.PRESETS), spec.name
        assert "torch" in backends.available(spec.registry), spec.name  # the eager reference is always there


@pytest.mark.parametrize("name", sorted(API_OPS))
def test_work_formulas_are_positive_and_add_up(name):
    spec = cases.SPECS[name]
    for preset in cases.PRESETS:
        for size in spec.sizes[preset]:
            work = spec.work(size.dims, 4)
            assert set(work) == set(spec.modes)
            for mode, (flops, nbytes) in work.items():
                assert flops >= 0 and nbytes > 0 and math.isfinite(flops), (name, size.label, mode)
            if spec.grad:
                assert work["fwd+bwd"] == pytest.approx(tuple(a + b for a, b in zip(work["fwd"], work["bwd"])))


def test_inputs_are_random_and_seeded():
    spec = cases.SPECS["info_nce"]
    size = spec.sizes["quick"][0]
    cpu = torch.device("cpu")
    seed = cases.case_seed(spec.name, size, torch.float32)
    a = spec.build(size, torch.float32, cpu, cases.generator(cpu, seed))
    b = spec.build(size, torch.float32, cpu, cases.generator(cpu, seed))
    assert torch.equal(a.args[0], b.args[0])  # the memory worker rebuilds exactly these
    assert (a.args[0] != 0).all() and a.args[0].requires_grad


def test_ema_shapes_match_the_architectures():
    assert len(cases.models.resnet50()) == 161
    assert cases.models.numel(cases.models.resnet50()) == 25_557_032
    assert cases.models.numel(cases.models.vit(768, 12)) == pytest.approx(86.6e6, rel=1e-3)
    assert cases.models.numel(cases.models.vit(1024, 24)) == pytest.approx(304.3e6, rel=1e-3)


def test_sizes_overrides_and_sweeps():
    spec = cases.SPECS["info_nce"]
    cpu = torch.device("cpu")
    (s,) = run.sizes_for(spec, ["N=512:D=32"], cpu)
    assert s.dims == {"N": 512, "M": spec.sizes["small"][0].dims["M"], "D": 32}
    assert [x.label for x in run.sizes_for(spec, ["mocov3"], cpu)] == ["mocov3"]
    assert run.sizes_for(cases.SPECS["ema_update_"], ["N=512"], cpu) == []
    sweep = cases.sweep_sizes(spec, spec.sizes["quick"][0], "N", 1024, 4096)
    assert [(x.dims["N"], x.dims["M"]) for x in sweep] == [(1024, 1024), (2048, 2048), (4096, 4096)]


def test_triton_is_not_timed_on_cpu():
    cpu = torch.device("cpu")
    for spec in cases.SPECS.values():
        for impl in impls.discover(spec, cpu, ["ours"]):
            if impl.kind == "triton":
                assert impl.skip == "interpreter", spec.name
    assert impls.discover(cases.SPECS["clip_loss"], cpu, ["inf_cl"])[0].skip == "needs CUDA"


def test_cli_quick_cpu_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["info_nce", "ema_update_", "--quick", "--device", "cpu", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Summary" in printed and "info_nce" in printed

    doc = json.loads((out / "results.json").read_text())
    assert {"environment", "roofline", "config", "formulas", "results"} <= set(doc)
    assert doc["environment"]["torch"] == torch.__version__
    assert doc["roofline"]["matmul_tflops"] > 0 and doc["roofline"]["copy_gbps"] > 0
    records = doc["results"]
    keys = {"op", "size", "dims", "dtype", "impl", "group", "kind", "mode", "status", "median_ms", "p20_ms",
            "p80_ms", "peak_mem_bytes", "flops", "bytes", "tflops", "gbps", "roofline_frac", "speedup_vs_eager"}
    assert all(keys <= set(r) for r in records)

    # The EMA baselines go through the same harness: timed, their allocator peak taken in the timing process
    # and their RSS growth in the same worker as every other implementation.
    base = {r["impl"]: r for r in records if r["group"] == "baselines"}
    assert set(base) == {"foreach_lerp", "python_loop"}
    for r in base.values():
        assert r["status"] == "ok" and r["mem_method"] == memory.CPU_ALLOC_METHOD, r
        assert r["rss_method"] == memory.RSS_METHOD and r["rss_growth_bytes"] >= 0, r
    # Exact, not luck: the fused lerp allocates nothing; the loop's peak is at its largest parameter, where
    # p_t * m, p_s * (1 - m) and their sum are alive at once (3 × 4 bytes × its numel), and the tensors it
    # replaces are freed as it goes (otherwise the peak would grow to the whole model).
    assert base["foreach_lerp"]["peak_mem_bytes"] == 0, base["foreach_lerp"]
    largest = max(math.prod(s) for s in cases._ema_shapes(cases.SPECS["ema_update_"].sizes["quick"][0]))
    assert 3 * 4 * largest <= base["python_loop"]["peak_mem_bytes"] < 4 * 4 * largest, base["python_loop"]

    eager = [r for r in records if r["impl"] == "eager"]
    assert {(r["op"], r["mode"]) for r in eager} == {("info_nce", "fwd"), ("info_nce", "bwd"),
                                                     ("info_nce", "fwd+bwd"), ("ema_update_", "fwd")}
    for r in records:
        if r["status"] == "ok":
            assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0, r
            if r["p20_ms"] is not None:
                assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], r
            assert r["gbps"] > 0 and r["roofline_frac"] > 0, r
        else:
            assert r["status"] == "skipped" and r["reason"], r
    # --quick leaves torch.compile out, and says so in the results.
    comp = [r for r in records if r["impl"] == "compile"]
    assert comp and all(r["status"] == "skipped" and "--quick" in r["reason"] for r in comp), comp
    assert all(r["speedup_vs_eager"] == pytest.approx(1.0) for r in eager)
    # The allocator peak is exact at any size: eager info_nce materializes its N×M fp32 logits (256 KiB here)
    # and a log-softmax of the same size; nothing near the ~120 MiB of a first call in a fresh process.
    info = {r["mode"]: r for r in eager if r["op"] == "info_nce"}
    logits = 256 * 256 * 4
    for mode, r in info.items():
        assert r["mem_method"] == memory.CPU_ALLOC_METHOD, r
        assert 2 * logits <= r["peak_mem_bytes"] < 16 << 20, (mode, r["peak_mem_bytes"])
        # RSS growth is measured too (whether 256 KiB shows depends on the kernel's per-CPU batching:
        # test_sweep_writes_time_and_memory_plots checks it above the resolution).
        assert r["rss_method"] == memory.RSS_METHOD and r["rss_growth_bytes"] is not None, r
    assert doc["environment"]["rss_resolution_bytes"] == memory.rss_resolution_bytes()
    # The CPU path of info_nce (when registered) is timed against eager and agrees with it.
    ours = [r for r in records if r["op"] == "info_nce" and r["impl"] == "ours"]
    if "cpu" in backends.available("info_nce"):
        assert all(r["status"] == "ok" and r["check_rel_err"] < 1e-4 for r in ours), ours

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records)
    assert set(report.CSV_FIELDS) == set(rows[0])
    assert all(float(r["median_ms"]) > 0 for r in rows if r["status"] == "ok")
    assert (out / "table.txt").read_text().startswith("sslkernels benchmark")
    md = (out / "results.md").read_text()
    assert md.startswith("# sslkernels benchmark") and "| op | size |" in md and "![time](time.png)" in md
    assert doc["environment"]["git_commit"] is not None
    assert doc["config"]["impls"] == ["ours", "eager", "baselines", "peers"]
    for png in ("time.png", "memory.png", "speedup.png", "roofline.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png

    # The table can be regenerated from results.json alone.
    assert main(["--report", str(out / "results.json")]) == 0
    assert "Details" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(API_OPS))
def test_every_op_runs_through_the_harness(name):
    """A tiny case of every op, every mode, ours and eager: timed, checked against eager, work placed."""
    spec = cases.SPECS[name]
    cpu = torch.device("cpu")
    tiny = {k: max(1, v // 4) if k in ("N", "M", "K", "B", "P") and v >= 64 else v
            for k, v in spec.sizes["quick"][0].dims.items()}
    size = cases.Size("tiny", tiny) if name != "ema_update_" else spec.sizes["quick"][0]
    cfg = run.Config(ops=[name], sizes=["quick"], dtype=torch.float32, impls=["ours", "eager"], device=cpu,
                     quick=True, memory=False, budget=Budget(cpu_s=0.002, min_reps=1, max_reps=3))
    recs = run.run_case(spec, size, torch.float32, cfg, spec.modes)
    run._derive_bwd(recs)
    run._ratios(recs)
    run._work(recs, {"matmul_tflops": 0.05, "copy_gbps": 5.0})
    eager = [r for r in recs if r["impl"] == "eager"]
    assert {r["mode"] for r in eager} == set(spec.modes)
    for r in recs:
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "ok":
            assert r["median_ms"] > 0 and r["gbps"] > 0, r
            if r["check_rel_err"] is not None:
                assert r["check_rel_err"] < 1e-3, r


def test_targets_preset_plans_exactly_the_cpu_targets():
    cpu = torch.device("cpu")
    cfg = run.Config(ops=[], sizes=["targets"], dtype=torch.float32, impls=None, device=cpu)
    plan = {(p.spec.name, p.sizes[0].label): p for p in run.plan(cfg)}
    assert set(plan) == {("info_nce", "cpu-target"), ("nt_xent", "simclr"), ("dino_loss", "small"),
                         ("ema_update_", "resnet50")}
    assert plan[("info_nce", "cpu-target")].sizes[0].dims == {"N": 8192, "M": 8192, "D": 128}
    assert plan[("info_nce", "cpu-target")].modes == ("fwd+bwd",)
    assert plan[("ema_update_", "resnet50")].impls == ["ours", "foreach_lerp", "python_loop"]
    assert plan[("ema_update_", "resnet50")].sizes[0].dims["tensors"] == 161
    # --impl narrows a target run; other sizes can come along.
    cfg = run.Config(ops=["info_nce"], sizes=["targets", "quick"], dtype=torch.float32, impls=["ours"], device=cpu)
    plan = run.plan(cfg)
    assert [(p.spec.name, p.sizes[0].label, p.impls) for p in plan] == [
        ("info_nce", "cpu-target", ["ours"]), ("info_nce", "quick", ["ours"])]
    # Every GPU target's case and reference exists (the H100 run reads them off the same way).
    for op, size, dtype, modes, names in targets.cases("cuda"):
        assert op in cases.SPECS and dtype in cases.DTYPES and set(modes) <= set(cases.SPECS[op].modes), op


def _rec(op, size, dims, impl, group, mode, ms, mem):
    return {"op": op, "size": size, "dims": dims, "dtype": "fp32", "impl": impl, "group": group, "kind": "cpu",
            "mode": mode, "status": "ok", "reason": "", "median_ms": ms, "peak_mem_bytes": mem}


def test_targets_are_read_off_the_records():
    d = {"N": 8192, "M": 8192, "D": 128}
    r50 = cases.SPECS["ema_update_"].sizes["small"][0]
    doc = {"config": {"device": "cpu"}, "roofline": {"matmul_tflops": 0.05, "copy_gbps": 8.0},
           "results": [_rec("info_nce", "cpu-target", d, "ours", "ours", "fwd+bwd", 900.0, 40 << 20),
                       _rec("info_nce", "cpu-target", d, "eager", "eager", "fwd+bwd", 1000.0, 1 << 30),
                       _rec("ema_update_", "resnet50", r50.dims, "ours", "ours", "fwd", 10.0, 0),
                       _rec("ema_update_", "resnet50", r50.dims, "foreach_lerp", "baselines", "fwd", 11.0, 0),
                       _rec("ema_update_", "resnet50", r50.dims, "python_loop", "baselines", "fwd", 40.0, 1 << 20)]}
    got = {(t["op"], t["metric"], t["limit"]): t for t in targets.evaluate(doc)}
    assert got[("info_nce", "mem_ratio", 0.1)]["value"] == pytest.approx(40 / 1024)
    assert got[("info_nce", "mem_ratio", 0.1)]["verdict"] == "pass"
    assert got[("info_nce", "time_ratio", 1.0)]["value"] == pytest.approx(0.9)
    assert got[("ema_update_", "speedup", 1.0)]["verdict"] == "pass"
    assert got[("ema_update_", "speedup", 5.0)]["value"] == pytest.approx(4.0)
    assert got[("ema_update_", "speedup", 5.0)]["verdict"] == "FAIL"
    assert not any(t["op"] == "nt_xent" for t in targets.evaluate(doc))  # not in this run: not listed
    head, rows = report.target_rows(doc | {"targets": list(got.values())})
    assert len(rows) == 4 and "FAIL" in {r[4] for r in rows}


def test_sweep_writes_time_and_memory_plots(tmp_path):
    out = tmp_path / "sweep"
    rc = main(["info_nce", "--sweep", "N", "--sweep-start", "512", "--sweep-max", "1024", "--impl", "ours,eager",
               "--quick", "--device", "cpu", "--out", str(out), "--no-progress", "--threads", "1"])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    ns = sorted({r["dims"]["N"] for r in doc["results"]})
    assert ns == [512, 1024] and all(r["mode"] == "fwd+bwd" and r["sweep"] == "N" for r in doc["results"])
    assert all(r["peak_mem_bytes"] is not None for r in doc["results"] if r["status"] == "ok")
    # Eager at N=1024 holds its 1024×1024 fp32 logits (4 MiB) and a gradient of the same size: the allocator
    # peak sees them exactly; the worker's RSS growth sees them too, less at most the kernel's per-CPU
    # batching (rss_resolution_bytes: 2 MiB on 16 cores), and counts the op, not the ~120 MiB of a first call.
    eager = [r for r in doc["results"] if r["impl"] == "eager" and r["dims"]["N"] == 1024][0]
    logits = 1024 * 1024 * 4
    assert 2 * logits <= eager["peak_mem_bytes"] < 64 << 20, eager
    assert 2 * logits - memory.rss_resolution_bytes() <= eager["rss_growth_bytes"] < 64 << 20, eager
    ours = [r for r in doc["results"] if r["impl"] == "ours" and r["dims"]["N"] == 1024][0]
    if ours["kind"] == "cpu":  # the chunked CPU path never holds the full logits
        assert ours["peak_mem_bytes"] < eager["peak_mem_bytes"], (ours, eager)
    for png in ("sweep_time.png", "sweep_memory.png"):
        assert (out / png).stat().st_size > 10_000, png
    assert "![sweep_time](sweep_time.png)" in (out / "results.md").read_text()


def test_profile_step_reports_host_and_kernel_time(tmp_path, capsys):
    mod = load_benchmark_script("profile_step")
    assert mod.main(["dino_loss", "--sizes", "quick", "--steps", "2", "--device", "cpu", "--out", str(tmp_path)]) == 0
    (rec,) = json.loads((tmp_path / "profile.json").read_text())
    assert rec["op"] == "dino_loss" and rec["mode"] == "fwd+bwd" and rec["host_bound"] is None
    assert rec["step_ms"] > 0 and rec["host_ms"] > 0 and rec["kernel_ms"] > 0 and rec["top"]
    assert "dino_loss [" in capsys.readouterr().out


def test_dino_variants_compares_the_two_paths(tmp_path):
    pytest.importorskip("triton")
    mod = load_benchmark_script("dino_variants")
    assert mod.main(["--out", str(tmp_path), "--dtype", "fp32", "--programs", "2", "--blocks", "64", "--stages", "1",
                     "--crops", "1", "2", "--budget", "600"]) == 0
    rows = json.loads((tmp_path / "dino_variants.json").read_text())
    assert [r["variant"] for r in rows] == ["two-pass", "fused (default launch)",
                                            "fused programs=2 block=64 stages=1 crops=1",
                                            "fused programs=2 block=64 stages=1 crops=2"]
    for r in rows:  # the fused path agrees with the two-pass kernels
        assert r["ms"] > 0 and r["loss_diff"] < 1e-5 and r["grad_diff"] < 1e-5, r
    (line,) = mod.verdicts(rows)
    best = min(rows[1:], key=lambda r: r["ms"])
    assert line.startswith("fp32: two-pass") and best["variant"] in line and "target" in line
    fake = [dict(rows[0], ms=2.0, floor_ratio=4.0), dict(rows[1], ms=1.0, floor_ratio=1.4)]
    assert "meets" in mod.verdicts(fake)[0] and "make it the default" in mod.verdicts(fake)[0]
    fake = [dict(rows[0], ms=1.0, floor_ratio=1.6), dict(rows[1], ms=2.0, floor_ratio=3.2)]
    assert "misses" in mod.verdicts(fake)[0] and "keep the two-pass" in mod.verdicts(fake)[0]


# Host work per fwd+bwd step (torch ops, Triton launches) at most: what a small batch's GPU step is made of.
# Lower is better; raise a budget only for a reason stated in benchmarks/NOTES.md.
HOST_BUDGET = {"moco_loss": (13, 2), "info_nce": (15, 6), "clip_loss": (35, 9), "nt_xent": (36, 6),
               "supcon_loss": (39, 3), "siglip_loss": (11, 3)}


def test_host_ops_per_step_within_budget():
    pytest.importorskip("triton")
    from sslkernels.ops import contrastive
    mod = load_benchmark_script("host_ops")
    kernels = {n: getattr(contrastive, n) for n in dir(contrastive) if n.endswith("_kernel")}
    steps = mod._steps()  # the sizes the budget was counted at (they pick the path: key split or not)
    for op, (ops_max, launches_max) in HOST_BUDGET.items():
        r = mod.count(op, steps[op], repeats=1)
        assert 0 < r["torch_ops"] <= ops_max and 0 < r["triton_launches"] <= launches_max, r
    assert all(getattr(contrastive, n) is k for n, k in kernels.items())  # the stubs are gone again


def test_merge_runs_into_one_report(tmp_path, capsys):
    """A preset run in parts (as on a GPU with a per-command limit) becomes one report; the targets are read
    off the merged records, and one whose sides come from different parts says so."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--quick", "--device", "cpu", "--no-progress", "--no-memory", "--impl", "ours,eager"]
    assert main(["info_nce", "--sizes", "N=64:M=64:D=16", *common, "--out", str(a)]) == 0
    assert main(["nt_xent", "ema_update_", "--sizes", "quick", *common, "--out", str(b)]) == 0
    capsys.readouterr()
    out = tmp_path / "merged"
    assert main(["--merge", str(a / "results.json"), str(b / "results.json"), "--out", str(out)]) == 0
    assert "Summary" in capsys.readouterr().out
    doc = json.loads((out / "results.json").read_text())
    parts = [json.loads((d / "results.json").read_text()) for d in (a, b)]
    assert {r["op"] for r in doc["results"]} == {"info_nce", "nt_xent", "ema_update_"}
    assert len(doc["results"]) == sum(len(p["results"]) for p in parts)
    assert [m["file"] for m in doc["merged_from"]] == [str(a / "results.json"), str(b / "results.json")]
    assert {r["run"] for r in doc["results"] if r["op"] == "info_nce"} == {0}
    assert doc["config"]["ops"] == ["info_nce", "nt_xent", "ema_update_"]
    assert (out / "table.txt").exists() and (out / "results.md").exists()

    # Without matplotlib the merged report says why it has no plots, as a normal run does.
    import sys
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "matplotlib", None)  # import fails
        assert main(["--merge", str(a / "results.json"), "--out", str(tmp_path / "noplots")]) == 0
        assert main(["--report", str(a / "results.json"), "--out", str(tmp_path / "noplots2")]) == 0
    assert capsys.readouterr().err.count("matplotlib is not installed") == 2

    # The same part twice: a case measured twice keeps the later record, nothing doubles.
    assert main(["--merge", str(a / "results.json"), str(a / "results.json"), "--out", str(tmp_path / "m2")]) == 0
    twice = json.loads((tmp_path / "m2" / "results.json").read_text())
    assert len(twice["results"]) == len(parts[0]["results"]) and {r["run"] for r in twice["results"]} == {1}

    # Runs from different devices do not merge.
    other = dict(parts[1], environment=dict(parts[1]["environment"], device_name="another CPU"))
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["--merge", str(a / "results.json"), str(tmp_path / "other.json"), "--out", str(tmp_path / "m3")]) == 2
    assert "different devices" in capsys.readouterr().err
    assert main(["--merge", str(a / "results.json")]) == 2  # no --out


def test_merge_marks_targets_across_parts():
    from sslkernels.bench import merge as bench_merge
    t = targets.targets_for("cuda")
    ntx = next(x for x in t if x.op == "nt_xent" and x.metric == "time_ratio")
    env = {"device_name": "GPU", "device": "cuda"}
    roof = {"matmul_tflops": 1.0, "copy_gbps": 1.0}

    def rec(op, size, impl, ms):
        return {"op": op, "size": size.label, "dims": dict(size.dims), "dtype": "bf16", "impl": impl,
                "mode": "fwd+bwd", "status": "ok", "median_ms": ms, "peak_mem_bytes": 0}

    info_size = next(x for x in t if x.op == "info_nce" and x.metric == "matmul_frac").size
    docs = [{"environment": env, "roofline": roof, "config": {"device": "cuda", "ops": [op]}, "results": [r]}
            for op, r in (("nt_xent", rec("nt_xent", ntx.size, "ours", 5.0)),
                          ("info_nce", rec("info_nce", info_size, "ours", 10.0)))]
    doc = bench_merge.merge(docs, ["a", "b"])
    (row,) = [x for x in doc["targets"] if x["op"] == "nt_xent"]
    assert row["value"] == pytest.approx(0.5) and row["verdict"] == "pass"
    assert "different runs" in row["why"]


def test_merged_targets_read_the_roofline_of_the_run_that_measured_them():
    # A resumed call's cases against its own matmul rate and bandwidth, not the first call's.
    from sslkernels.bench import merge as bench_merge
    t = targets.targets_for("cuda")
    frac = next(x for x in t if x.op == "info_nce" and x.metric == "matmul_frac")
    big = next(x for x in t if x.op == "info_nce" and x.metric == "runs")
    env = {"device_name": "GPU", "device": "cuda"}

    def rec(size, status="ok", ms=10.0):
        return {"op": "info_nce", "size": size.label, "dims": dict(size.dims), "dtype": "bf16", "impl": "ours",
                "mode": "fwd+bwd", "status": status, "reason": "", "median_ms": ms if status == "ok" else None,
                "peak_mem_bytes": 0}

    docs = [{"environment": env, "roofline": {"matmul_tflops": tf, "copy_gbps": 1.0},
             "config": {"device": "cuda", "ops": ["info_nce"]}, "results": results}
            for tf, results in ((500.0, [rec(big.size, "skipped")]), (800.0, [rec(frac.size)]))]
    doc = bench_merge.merge(docs, ["first", "second"])
    row = next(x for x in doc["targets"] if x["metric"] == "matmul_frac")
    assert row["value"] == pytest.approx(8 * 32768**2 * 256 / 800e12 / 10e-3)
    # A case the time budget did not reach (pending, recorded as skipped) has no verdict, not "runs: FAIL".
    runs = next(x for x in doc["targets"] if x["metric"] == "runs")
    assert runs["value"] is None and runs["verdict"] == "-"
    oom = bench_merge.merge([docs[0] | {"results": [rec(big.size, "oom")]}], ["a"])
    assert next(x for x in oom["targets"] if x["metric"] == "runs")["verdict"] == "FAIL"


def test_a_target_run_times_only_the_implementations_its_targets_read():
    # "ours" in a target's list is ours as users call it, not every fused kind the group "ours" adds.
    spec = cases.SPECS["info_nce"]
    cpu = torch.device("cpu")
    grouped = {i.name for i in impls.discover(spec, cpu, ["ours", "eager"])}
    exact = {i.name for i in impls.discover(spec, cpu, impls.Exactly(["ours", "eager"]))}
    assert exact == {"ours", "eager"} and grouped > exact  # ours:triton runs here in the interpreter
    assert all(isinstance(p.impls, impls.Exactly) for p in run.plan(
        run.Config(ops=[], sizes=["targets"], dtype=torch.float32, impls=None, device=cpu)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_peak_memory_leaves_out_the_gradients_the_step_returns():
    # As on the CPU: extra memory is beyond the inputs and their gradients, for ours and eager alike.
    from sslkernels.bench import memory
    x = torch.randn(1 << 22, device="cuda", requires_grad=True)  # 16 MiB

    def step():  # no temporary of x's size: the one 16 MiB allocation is the new gradient
        x.grad = None
        x.sum().mul(2).backward()

    assert memory.peak_cuda(step) < (4 << 20)  # the gradient counted was 16 MiB


def _cases_of(doc):
    return {(r["op"], r["size"], json.dumps(r["dims"]), r["dtype"]) for r in doc["results"]}


def test_time_budget_leaves_pending_cases_that_resume_measures(tmp_path, capsys):
    """A run cut short by --time-budget records its cases left as pending (the report says INCOMPLETE);
    --resume measures exactly those and writes both runs as one report; resuming a complete run runs nothing."""
    common = ["info_nce", "--sizes", "N=32:M=32:D=16,N=40:M=48:D=24", "--device", "cpu", "--quick", "--no-progress",
              "--no-memory", "--impl", "ours,eager"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main([*common, "--time-budget", "1e-9", "--out", str(a)]) == 0  # spent on the roofline already
    printed = capsys.readouterr().out
    assert "INCOMPLETE: 2 cases not run yet" in printed and printed.count("PENDING (--resume runs it)") == 2
    first = json.loads((a / "results.json").read_text())
    ran = [r for r in first["results"] if r["group"] in ("ours", "eager") and r["impl"] != "ours:triton"]
    assert ran and all(r.get("pending") and r["median_ms"] is None for r in ran)

    assert main([*common, "--resume", str(a / "results.json"), "--out", str(b)]) == 0
    printed = capsys.readouterr().out
    assert "INCOMPLETE" not in printed and "joined from 2 runs" in printed
    second = json.loads((b / "results.json").read_text())
    assert not any(r.get("pending") for r in second["results"]) and _cases_of(second) == _cases_of(first)
    assert {r["run"] for r in second["results"]} == {1}  # measured by the resumed run, the pending ones replaced
    assert [m["file"] for m in second["merged_from"]] == [str(a / "results.json"), str(b / "results.json")]
    assert all(r["status"] == "ok" for r in second["results"] if r["impl"] in ("ours", "eager"))

    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "run_case", lambda *a, **k: calls.append(a) or [])
        assert main([*common, "--resume", str(b / "results.json"), "--out", str(c)]) == 0
    assert calls == []  # nothing left to measure
    third = json.loads((c / "results.json").read_text())
    assert len(third["results"]) == len(second["results"]) and len(third["merged_from"]) == 3
    assert {r["run"] for r in third["results"]} == {1}  # a merged input keeps its records' runs

    # Only a per-op run on this device resumes.
    other = dict(second, environment=dict(second["environment"], device_name="another CPU"))
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main([*common, "--resume", str(tmp_path / "other.json"), "--out", str(tmp_path / "d")]) == 2
    assert main([*common, "--resume", str(tmp_path / "missing.json"), "--out", str(tmp_path / "d")]) == 2
    assert main([*common, "--time-budget", "0", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "another CPU" in err and "missing.json" in err and "--time-budget" in err


def test_a_killed_run_keeps_what_it_measured(tmp_path):
    """results.json is rewritten after every case: a run killed in its second case leaves the first measured
    and the rest pending, and --resume then runs only those."""
    common = ["info_nce", "--sizes", "N=32:M=32:D=16,N=40:M=40:D=16,N=48:M=48:D=16", "--device", "cpu", "--quick",
              "--no-progress", "--no-memory", "--impl", "ours,eager"]
    real = run.run_case
    calls = []

    def killed_in_second(*a, **k):
        calls.append(a[1].dims["N"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a timeout's SIGTERM / SIGKILL leaves: no final write
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "run_case", killed_in_second)
        with pytest.raises(KeyboardInterrupt):
            main([*common, "--out", str(tmp_path / "a")])
    doc = json.loads((tmp_path / "a" / "results.json").read_text())
    by_n = {}
    for r in doc["results"]:
        by_n.setdefault(r["dims"]["N"], []).append(r)
    assert sorted(by_n) == [32, 40, 48]
    assert not any(r.get("pending") for r in by_n[32]) and any(r["status"] == "ok" for r in by_n[32])
    assert all(r.get("pending") for n in (40, 48) for r in by_n[n] if r["impl"] in ("ours", "eager"))
    assert not (tmp_path / "a" / "results.json.tmp").exists()

    calls.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "run_case", lambda *a, **k: calls.append(a[1].dims["N"]) or real(*a, **k))
        assert main([*common, "--resume", str(tmp_path / "a" / "results.json"), "--out", str(tmp_path / "b")]) == 0
    assert calls == [40, 48]
    done = json.loads((tmp_path / "b" / "results.json").read_text())
    assert not any(r.get("pending") for r in done["results"])
    assert {r["dims"]["N"]: r["run"] for r in done["results"]} == {32: 0, 40: 1, 48: 1}


def test_a_resumed_sweep_remembers_where_implementations_stopped(tmp_path):
    """A sweep killed after eager ran out of memory at N=64: the resumed run does not try eager at N=128."""
    common = ["info_nce", "--sweep", "N", "--sweep-start", "32", "--sweep-max", "128", "--sizes", "N=32:M=32:D=16",
              "--device", "cpu", "--quick", "--no-progress", "--no-memory", "--impl", "ours,eager"]
    real = run.run_case

    def eager_oom_then_killed(spec, size, *a, **k):
        if size.dims["N"] == 128:
            raise KeyboardInterrupt
        recs = real(spec, size, *a, **k)
        if size.dims["N"] == 64:
            for r in recs:
                if r["impl"] == "eager":
                    r.update(status="oom", reason="CUDA out of memory (made up by the test)", median_ms=None)
        return recs

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "run_case", eager_oom_then_killed)
        with pytest.raises(KeyboardInterrupt):
            main([*common, "--out", str(tmp_path / "a")])
    assert main([*common, "--resume", str(tmp_path / "a" / "results.json"), "--out", str(tmp_path / "b")]) == 0
    doc = json.loads((tmp_path / "b" / "results.json").read_text())
    last = {r["impl"]: r for r in doc["results"] if r["dims"]["N"] == 128 and r["mode"] == "fwd+bwd"}
    assert last["ours"]["status"] == "ok" and last["ours"]["run"] == 1
    assert last["eager"]["status"] == "skipped" and last["eager"]["reason"].startswith("stopped: out of memory")
    assert all(r.get("sweep") == "N" for r in doc["results"])


def test_graph_replay_implementation():
    """ours:graph runs only when named, and only on CUDA; its callables replay captured steps (a stand-in
    capture here, which calls the step): the forward, and forward + backward through torch.autograd.grad,
    with the backward alone derived and the memory not measured."""
    spec = cases.SPECS["moco_loss"]
    cpu = torch.device("cpu")
    assert impls.GRAPH not in [i.name for i in impls.discover(spec, cpu, ["ours"])]
    (g,) = [i for i in impls.discover(spec, cpu, [impls.GRAPH]) if i.name == impls.GRAPH]
    assert g.skip == "CUDA graphs need CUDA tensors" and g.graph

    size = cases.Size("t", {"N": 5, "K": 23, "D": 8}, "test")
    inputs = spec.build(size, torch.float32, cpu, cases.generator(cpu, 0))
    graphed = impls.Impl(impls.GRAPH, "ours", "graph", impls._registered(backends.available("moco_loss")["cpu"]),
                         graph=True)
    captured = []

    def capture(step):
        captured.append(step)
        return step  # "replay": run the step again

    calls = impls.build_callables(spec, inputs, size, graphed, cpu, capture=capture)
    assert len(captured) == 2 and calls.memory_note.startswith("not measured")
    ref = backends.available("moco_loss")["torch"](*inputs.args)
    assert torch.allclose(calls.fwd(), ref, rtol=1e-5)
    calls.fwd_bwd()
    assert all(x.grad is None for x in inputs.leaves)  # autograd.grad: the graph's own output buffers
    with pytest.raises(NotImplementedError):
        calls.for_mode("bwd")

    # The MoCo target reads the replayed step as well as the eager one.
    moco = [c for c in targets.cases("cuda") if c[0] == "moco_loss"]
    assert moco and impls.GRAPH in moco[0][4] and "ours" in moco[0][4]
    doc = {"config": {"device": "cuda"}, "roofline": {"copy_gbps": 1000.0, "matmul_tflops": 1.0},
           "results": [{"op": "moco_loss", "size": "mocov2", "dims": dict(moco[0][1].dims), "dtype": "bf16",
                        "impl": impl, "mode": "fwd+bwd", "status": "ok", "median_ms": ms, "peak_mem_bytes": None}
                       for impl, ms in (("ours", 1.5), (impls.GRAPH, 0.03))]}
    verdicts = {t["target"]: t["verdict"] for t in targets.evaluate(doc) if t["op"] == "moco_loss"}
    assert sorted(verdicts.values()) == ["FAIL", "pass"], verdicts  # 2·K·D·2 B = 33.6 MB: 34 µs at 1 TB/s


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("op", ["moco_loss", "ema_update_"])
def test_graph_replay_on_cuda(op, tmp_path):
    """The real capture: ours:graph through the harness on a GPU, its forward checked against eager's."""
    sizes = {"moco_loss": "N=64:K=4096:D=128", "ema_update_": "quick"}[op]
    assert main([op, "--sizes", sizes, "--device", "cuda", "--quick", "--no-progress", "--impl", "eager,ours,ours:graph",
                 "--dtype", "bf16" if op == "moco_loss" else "fp32", "--out", str(tmp_path)]) == 0
    recs = [r for r in json.loads((tmp_path / "results.json").read_text())["results"] if r["impl"] == "ours:graph"]
    assert recs and all(r["status"] == "ok" and r["median_ms"] > 0 for r in recs), recs
    fwd = next(r for r in recs if r["mode"] == "fwd")
    if op == "moco_loss":
        assert fwd["check_rel_err"] is not None and fwd["check_rel_err"] < 1e-2
        assert {r["mode"] for r in recs} == {"fwd", "bwd", "fwd+bwd"}


@pytest.mark.parametrize("how", ["legacy", "per-backend", "global"])
def test_roofline_tf32_toggle_under_every_tf32_api(how, numerics_restored):
    # The fp32 roofline measures cuBLAS with TF32 flipped and restores it. On torch >= 2.9 reading the legacy
    # allow_tf32 raises once the new fp32_precision API set TF32, which the bench's toggle and its
    # environment record did.
    from sslkernels.bench.roofline import _tf32_matmul_set
    from sslkernels.ops._common import tf32_matmul

    matmul = torch.backends.cuda.matmul
    if how == "legacy" or not hasattr(matmul, "fp32_precision"):
        matmul.allow_tf32 = True
    elif how == "per-backend":
        matmul.fp32_precision = "tf32"
    else:
        torch.backends.fp32_precision = "tf32"
    assert tf32_matmul()
    with _tf32_matmul_set(False):
        assert not tf32_matmul()
    assert tf32_matmul()