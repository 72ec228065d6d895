"""Smoke tests of the benchmark suite (sslkernels/bench): the CLI end to end on tiny CPU cases,
the case table's coverage of the API, and the pieces that decide what runs."""
import csv
import json
import math

import pytest
import torch

from sslkernels import backends
from sslkernels.bench import cases, impls, report, run
from sslkernels.bench.__main__ import main

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
    rc = main(["info_nce", "ema_update_", "--quick", "--device", "cpu", "--impl", "ours,eager", "--out", str(out)])
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
    assert all(r["speedup_vs_eager"] == pytest.approx(1.0) for r in eager)
    # Memory comes from the worker process on CPU; a failure there would leave a reason, not a number.
    info = [r for r in eager if r["op"] == "info_nce" and r["mode"] == "fwd"][0]
    assert info["peak_mem_bytes"] is not None and info["peak_mem_bytes"] > 0, info["mem_method"]
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

    # The table can be regenerated from results.json alone.
    assert main(["--report", str(out / "results.json")]) == 0
    assert "Details" in capsys.readouterr().out
