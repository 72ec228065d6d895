"""Reference trainers, every method: tiny smoke runs, exact resume, fused-vs-reference comparison, ImageFolder data."""
import json
import math

import pytest
import torch

from sslkernels.train import METHODS, core, main

TINY = ["--data", "digits", "--subset", "128", "--epochs", "1", "--batch-size", "32", "--knn-k", "5",
        "--fewshot-draws", "2", "--probe-iterations", "5", "--no-plots"]


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_and_checkpoints_its_state(tmp_path, method):
    extra = ["--local-crops", "2"] if method == "dino" else []
    report = main([method, *TINY, "--out", str(tmp_path), *extra])
    assert report["method"] == method and report["summary"]["complete"]
    assert [r["epoch"] for r in report["history"]] == [0, 1]
    assert len(report["step_losses"]) == 3  # 96 train images // 32
    assert all(math.isfinite(v) for v in report["step_losses"])
    for row in report["history"]:
        for key in ("knn_top1", "knn_fewshot", "linear_probe"):
            assert 0.0 <= row[key] <= 1.0
        assert row["rankme"] >= 1.0 and row["memory_mb"] > 0
    assert set(report["raw_pixels"]) == {"knn_top1", "knn_fewshot", "linear_probe"}
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    state = ckpt["model"]
    core.Encoder().load_state_dict(ckpt["encoder"])  # the evaluated encoder is usable on its own
    if method == "moco":  # the queue and its device pointer: 3 batches of 32 keys written
        assert state["queue.ptr"].item() == 96 and state["queue.queue"].shape == (1024, 32)
    if method in ("moco", "mocov3", "byol", "dino"):
        assert any(k.endswith("step") and v.item() == 3 for k, v in state.items())  # EMA teacher step counter
    if method == "dino":
        assert state["center"].abs().sum() > 0  # update_center_ ran
    assert {"optimizer", "scheduler", "loader", "rng"} <= ckpt.keys()


def _optimizer_state_equal(a: dict, b: dict) -> bool:
    return a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys() and all(
        _state_equal(a["state"][i], b["state"][i]) for i in a["state"])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_after_interruption_reproduces_the_uninterrupted_run(tmp_path, method):
    # Every method: weights, optimizer, schedule, shuffling and augmentation RNG; moco: queue + pointer + EMA
    # teacher; mocov3/byol: EMA schedule step; dino: center, teacher, temperature schedule, multi-crop.
    args = [method, *TINY, "--epochs", "2", "--seed", "3"] + (["--local-crops", "1"] if method == "dino" else [])
    full = main([*args, "--out", str(tmp_path / "full")])
    part = main([*args, "--out", str(tmp_path / "part"), "--stop-after", "1"])
    assert not part["summary"]["complete"] and len(part["step_losses"]) == 3
    resumed = main([*args, "--resume", str(tmp_path / "part" / "checkpoint.pt")])  # --out: the checkpoint's dir
    assert resumed["step_losses"] == full["step_losses"]  # bit for bit
    assert [r["knn_top1"] for r in resumed["history"]] == [r["knn_top1"] for r in full["history"]]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert b["epoch"] == 2
    assert _state_equal(a["model"], b["model"])
    assert _optimizer_state_equal(a["optimizer"], b["optimizer"]) and a["scheduler"] == b["scheduler"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert json.loads((tmp_path / "part" / "report.json").read_text())["summary"]["complete"]


def test_resume_refuses_a_different_run(tmp_path, capsys):
    main(["simclr", *TINY, "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["simclr", *TINY, "--lr", "0.1", "--resume", str(tmp_path / "checkpoint.pt")])
    assert "--lr 0.1 (was 0.002)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a method's own option counts too
        main(["simclr", *TINY, "--temperature", "0.3", "--resume", str(tmp_path / "checkpoint.pt")])
    assert "--temperature 0.3 (was 0.5)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["byol", *TINY, "--resume", str(tmp_path / "checkpoint.pt")])
    assert "is a simclr checkpoint, not byol" in capsys.readouterr().err


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b""), "not a checkpoint of sslkernels.train (EOFError"),
    (lambda p: p.write_text('{"method": "simclr"}'), "not a checkpoint of sslkernels.train (UnpicklingError"),
    (lambda p: torch.save(torch.zeros(3), p), "not a checkpoint of sslkernels.train (no method, epoch"),
    (lambda p: torch.save({"method": "simclr"}, p), "not a checkpoint of sslkernels.train (no epoch, config"),
    (lambda p: torch.save(core.Encoder().state_dict(), p), "not a checkpoint of sslkernels.train (no method"),
])
def test_resume_from_a_file_that_is_no_checkpoint_is_a_clear_error(tmp_path, capsys, make, message):
    path = tmp_path / "checkpoint.pt"
    make(path)
    with pytest.raises(SystemExit) as exc:
        main(["simclr", *TINY, "--resume", str(path)])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_resume_refuses_a_folder_whose_images_changed(tmp_path, capsys):
    # The same --data path with other images would silently change the schedule's length and the held-out split.
    from PIL import Image

    root = _folder(tmp_path / "data", per_class=12)
    args = ["simclr", "--data", str(root), "--image-size", "8", "--epochs", "2", "--batch-size", "4", "--knn-k", "3",
            "--fewshot-draws", "2", "--probe-iterations", "5", "--no-plots"]
    report = main([*args, "--out", str(tmp_path / "run"), "--stop-after", "1"])
    assert len(report["data"]["fingerprint"]) == 16
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    Image.new("RGB", (12, 12), (200, 10, 10)).save(root / "class0" / "0.png")  # one image replaced: same counts
    with pytest.raises(SystemExit):
        main([*args, "--resume", ckpt])
    err = capsys.readouterr().err
    assert "is not the data of the checkpoint's run: fingerprint" in err and "train" not in err.split("fingerprint")[1]
    _folder(tmp_path / "more", per_class=4)
    for c in range(2):  # four images added to each class
        for f in (tmp_path / "more" / f"class{c}").iterdir():
            f.rename(root / f"class{c}" / f"new{f.name}")
    with pytest.raises(SystemExit):
        main([*args, "--resume", ckpt])
    assert "train 24 (was 18)" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_resume_on_the_gpu(tmp_path):
    # The RNG states in a checkpoint must load on the CPU whatever the run's device (torch refuses CUDA ones).
    args = ["simclr", *TINY, "--epochs", "2", "--device", "cuda"]
    main([*args, "--out", str(tmp_path), "--stop-after", "1"])
    resumed = main([*args, "--resume", str(tmp_path / "checkpoint.pt")])
    assert resumed["summary"]["complete"] and len(resumed["step_losses"]) == 6


def test_clip_logit_scale_is_clamped_after_the_step_and_not_decayed(tmp_path):
    # As OpenCLIP's loop: a clamp inside the forward would pass no gradient above 100 and freeze the scale there.
    report = main(["clip", *TINY, "--init-temperature", "0.005", "--out", str(tmp_path)])  # scale 200 at the start
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    # clamped to log 100 after the first step, then learning on (the old in-forward clamp kept it at ~5.2983)
    assert math.log(50) < ckpt["model"]["logit_scale"].item() < math.log(100)
    groups = ckpt["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0] and len(groups[1]["params"]) == 1
    assert math.isfinite(report["step_losses"][-1])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_compare_mode_runs_both_impls_with_the_same_seed(tmp_path, capsys, method):
    extra = ["--local-crops", "1"] if method == "dino" else []
    result = main([method, *TINY, "--epochs", "2", "--impl", "both", "--out", str(tmp_path), "--no-checkpoint",
                   *extra])
    assert result["steps_compared"] == 6
    assert result["max_rel_loss_diff"] < 1e-3  # the acceptance bound (measured over 50 steps in the README run)
    assert result["speedup"] > 0
    assert json.loads((tmp_path / "compare.json").read_text())["method"] == method
    for impl, backend in (("fused", "auto"), ("reference", "torch")):
        assert json.loads((tmp_path / impl / "report.json").read_text())["backend"] == backend
    assert "fused vs reference" in capsys.readouterr().out


def test_report_has_plots_and_the_evaluation_protocol(tmp_path):
    report = main(["simclr", *TINY[:-1], "--out", str(tmp_path)])
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert "knn_fewshot" in report["evaluation"] and "before any training" in report["evaluation"]["random_init"]


# ------------------------------------------------------------------------------------------------ ImageFolder data
def _folder(root, classes=2, per_class=8, size=12):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def test_image_folder_trains(tmp_path):
    root = _folder(tmp_path / "data")
    report = main(["simclr", "--data", str(root), "--image-size", "16", "--epochs", "1", "--batch-size", "4",
                   "--knn-k", "3", "--fewshot-draws", "2", "--probe-iterations", "5", "--no-plots", "--out", str(tmp_path / "run")])
    assert report["data"]["image_shape"] == [3, 16, 16] and report["data"]["classes"] == 2
    assert math.isfinite(report["history"][-1]["loss"])


@pytest.mark.parametrize("make, message", [
    (lambda root: root.mkdir(), "no class folders found"),
    (lambda root: (root / "cats").mkdir(parents=True), "hold no images"),
    (lambda root: (_folder(root), (root / "class0" / "broken.png").write_bytes(b"not a png")),
     "1 of 17 images could not be read, e.g. class0/broken.png"),
    (lambda root: None, "not 'digits', 'synthetic' or an existing directory"),
    (lambda root: _folder(root, per_class=2), "4 images are too few to hold out"),
])
def test_bad_image_folder_is_a_clear_error(tmp_path, capsys, make, message):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(SystemExit) as exc:
        main(["simclr", "--data", str(root), "--epochs", "1", "--batch-size", "2", "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_fewshot_banks_and_linear_probe():
    labels = torch.arange(50) % 5
    banks = core.fewshot_banks(labels, 5, shots=2, draws=3)
    assert len(banks) == 3 and all(torch.bincount(labels[b], minlength=5).tolist() == [2] * 5 for b in banks)
    assert not torch.equal(banks[0], banks[1])
    assert torch.equal(core.fewshot_banks(labels, 5, 2, 3)[2], banks[2])  # fixed: same banks for every encoder
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (90,), generator=g)
    x = torch.nn.functional.one_hot(y, 3).float() * 4 + 0.1 * torch.randn(90, 3, generator=g)
    assert core.linear_probe(x[:60], y[:60], x[60:], y[60:], 3) == 1.0


def test_progress_bar_on_writes_to_stderr(tmp_path, capsys):
    main(["simclr", *TINY, "--progress", "on", "--no-checkpoint", "--out", str(tmp_path)])
    assert "simclr epoch 1/1" in capsys.readouterr().err
