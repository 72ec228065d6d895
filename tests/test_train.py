"""Reference trainers (sslkernels.train): a fast in-process smoke run, bad settings, and the pieces they share."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sslkernels.train import core, data, main

REPO = Path(__file__).resolve().parents[1]
TINY = ["--subset", "160", "--epochs", "1", "--batch-size", "32", "--knn-k", "5", "--fewshot-draws", "2",
        "--probe-iterations", "5", "--no-plots"]


def _run(tmp_path, *extra):
    report = main(["simclr", *TINY, "--out", str(tmp_path), *extra])
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["history"] == report["history"]
    return on_disk


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_simclr_smoke_writes_finite_report(tmp_path, impl):
    report = _run(tmp_path, "--impl", impl, "--data", "digits")
    assert report["backend"] == {"fused": "auto", "reference": "torch"}[impl]
    assert report["data"]["train"] + report["data"]["test"] == 160
    epochs = [row["epoch"] for row in report["history"]]
    assert epochs == [0, 1]  # epoch 0 is the random-init baseline, evaluated before any step
    assert report["history"][0]["loss"] is None
    for row in report["history"][1:]:
        assert math.isfinite(row["loss"]) and row["loss"] > 0
        assert row["samples_per_s"] > 0
    for row in report["history"]:
        assert 0.0 <= row["knn_top1"] <= 1.0
        assert 1.0 <= row["rankme"] <= 64.0
    assert report["summary"]["knn_top1_before"] == report["history"][0]["knn_top1"]
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    encoder = core.Encoder()
    encoder.load_state_dict(ckpt["encoder"])  # the saved encoder is usable as is
    assert ckpt["epoch"] == 1


def test_fused_and_reference_train_the_same(tmp_path):
    # Same seed, same data, same augmentations: only the loss backend differs, so the runs agree to rounding.
    fused = _run(tmp_path / "f", "--data", "synthetic", "--impl", "fused", "--no-checkpoint")
    ref = _run(tmp_path / "r", "--data", "synthetic", "--impl", "reference", "--no-checkpoint")
    assert fused["history"][1]["loss"] == pytest.approx(ref["history"][1]["loss"], rel=1e-4)


@pytest.mark.parametrize("method", ["moco", "clip"])
def test_compare_in_float64_agrees_and_repeats_reproduce(tmp_path, method):
    # --impl both with --dtype float64: no rounding difference is large enough to matter, so fused and
    # reference (queue / symmetric paths here) must agree to far below the 1e-3 acceptance bound.
    tiny = [a for a in TINY if a != "--no-plots"]
    result = main([method, *tiny, "--epochs", "2", "--data", "synthetic", "--impl", "both", "--dtype", "float64",
                   "--compare-repeats", "2", "--no-checkpoint", "--no-plots", "--out", str(tmp_path)])
    assert result["dtype"] == "float64" and result["steps_compared"] > 1
    assert result["max_rel_loss_diff"] < 1e-10
    assert result["repeats_reproduce_losses"] is True
    assert len(result["train_seconds_each_run"]["fused"]) == 2
    assert all(t > 0 for t in result["step_seconds_interleaved"].values()) and result["speedup_interleaved"] > 0
    fused = json.loads((tmp_path / "fused" / "report.json").read_text())
    assert fused["config"]["dtype"] == "float64"
    assert all(math.isfinite(x) for x in fused["step_losses"])


def test_batch_larger_than_data_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["simclr", "--data", "synthetic", "--batch-size", "5000", "--epochs", "1", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--batch-size 5000 is larger than the training split" in err and "1500" in err
    assert not (tmp_path / "report.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--temperature", "0"], "--temperature must be positive"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--subset", "1"], "subset must be an int >= 2"),
])
def test_bad_settings_exit_with_a_message(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        main(["simclr", "--data", "synthetic", "--out", str(tmp_path), *argv])
    assert message in capsys.readouterr().err


def test_cli_entry_point_reports_errors_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "sslkernels.train", "simclr", "--data", "synthetic",
                           "--batch-size", "100000", "--no-checkpoint"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "is larger than the training split" in proc.stderr and "Traceback" not in proc.stderr


def test_split_is_stratified_and_fixed():
    a = data.load("synthetic", "cpu")
    b = data.load("synthetic", "cpu")
    assert torch.equal(a.test_x, b.test_x)
    counts = torch.bincount(a.test_y, minlength=a.num_classes)
    assert counts.min() == counts.max() == 50  # 200 per class, a quarter held out


def test_augment_keeps_shape_and_varies_views():
    x = data.load("synthetic", "cpu").train_x[:64]
    torch.manual_seed(0)
    v1, v2 = data.Augment()(x), data.Augment()(x)
    assert v1.shape == x.shape and torch.isfinite(v1).all()
    assert not torch.allclose(v1, v2)
    torch.manual_seed(0)
    assert torch.equal(data.Augment()(x), v1)  # the global seed makes views repeatable


def test_knn_accuracy_matches_float64_weighted_vote():
    g = torch.Generator().manual_seed(0)
    bank, query = torch.randn(97, 12, generator=g), torch.randn(31, 12, generator=g)
    bank_y, query_y = torch.randint(0, 5, (97,), generator=g), torch.randint(0, 5, (31,), generator=g)
    k, t = 7, 0.07
    sims = torch.nn.functional.normalize(query.double(), dim=1) @ torch.nn.functional.normalize(bank.double(), dim=1).T
    top, idx = sims.topk(k, dim=1)
    votes = torch.zeros(31, 5, dtype=torch.float64).scatter_add_(1, bank_y[idx], (top / t).exp())
    expected = (votes.argmax(1) == query_y).double().mean().item()
    for backend in ("auto", "torch"):
        assert core.knn_accuracy(bank, bank_y, query, query_y, 5, k=k, temperature=t, backend=backend) == \
            pytest.approx(expected, abs=1e-6)
