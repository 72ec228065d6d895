"""The small shared core of the reference trainers: options, encoder, the loop, evaluation, checkpoints, reports.

A method (one file each: simclr.py, moco.py, ...) is an ``nn.Module`` subclass of :class:`Method` that builds
its networks in ``__init__`` and computes one step's loss in ``training_step``; :func:`fit` runs everything a
method repeats around that (optimizer and schedule, progress bar, per-epoch evaluation, checkpoint/resume,
report.json and plots). Because a method is a module, ``method.state_dict()`` already holds everything it
trains or keeps: EMA teacher (with its step counter), MoCo queue (with its device pointer), DINO center.

Evaluation protocol (each epoch, on the held-out split, the same for the random-init encoder of epoch 0, the
raw pixels and the trained encoder):

- ``knn_top1``: weighted kNN (DINO's eval_knn: cosine top-k of a bank, votes exp(sim/T)) with the whole labelled
  train split as bank.
- ``knn_fewshot``: the same kNN with a bank of only ``--fewshot-shots`` labelled images per class (default 1,
  i.e. 10 labels on digits, below the "1 % of labels" semi-supervised protocol), averaged over
  ``--fewshot-draws`` random draws of the bank (fixed seeds, independent of ``--seed``), as in MSN's
  1/2/5-images-per-class evaluation. On digits every encoder, even a random one, separates the classes well
  given 1347 labelled neighbours (random conv net 0.93, raw pixels 0.98), so the full-label number says little
  about the representation; with one label per class only a representation that puts images of a digit close
  together does well.
- ``linear_probe``: multinomial logistic regression (L-BFGS, standardized features) on the full labelled split.
- ``rankme``: RankMe effective rank of the train-split embeddings (sslkernels.rankme).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import sslkernels
from sslkernels import backends as _backends
from . import data as data_lib

IMPLS = {"fused": "auto", "reference": "torch"}  # --impl -> the backend= passed to every sslkernels op
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class ConfigError(ValueError):
    """A bad command-line setting or data set; the CLI prints it as an error message instead of a traceback."""


# ----------------------------------------------------------------------------------------------- options
def add_common_arguments(parser: argparse.ArgumentParser, *, epochs: int, batch_size: int, lr: float,
                         weight_decay: float = 1e-4) -> None:
    """Options every method shares; each method passes the defaults that suit it."""
    parser.add_argument("--data", default="digits",
                        help="digits: scikit-learn's 1797 8x8 handwritten digits (bundled, no download); "
                             "synthetic: generated digit-like blobs (no scikit-learn needed); "
                             "PATH: an ImageFolder directory PATH/<class>/<image>")
    parser.add_argument("--image-size", type=int, default=32, help="side the images of --data PATH are resized to")
    parser.add_argument("--impl", choices=[*sorted(IMPLS), "both"], default="fused",
                        help="fused: sslkernels ops with backend='auto'; reference: backend='torch' (eager oracle) "
                             "for every op; both: run the two with the same seed and compare (as --compare)")
    parser.add_argument("--compare", action="store_true", help="same as --impl both")
    parser.add_argument("--compare-steps", type=int, default=50,
                        help="--impl both: compare the per-step losses of the first this many steps")
    parser.add_argument("--compare-repeats", type=int, default=3,
                        help="--impl both: train each impl this many times, alternating, and compare median times "
                             "(the losses of repeats must be identical: it checks that too)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="parameters and data; float64 takes float32 rounding out of --impl both: training "
                             "amplifies a 1e-7 difference in a gradient to ~1e-3 in the loss within 50 steps")
    parser.add_argument("--epochs", type=int, default=epochs, help="passes over the training split (0: only evaluate)")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="images per step")
    parser.add_argument("--lr", type=float, default=lr, help="AdamW peak learning rate (cosine decay to 0)")
    parser.add_argument("--weight-decay", type=float, default=weight_decay, help="AdamW weight decay")
    parser.add_argument("--device", default=None, help="cpu or cuda (None: cuda when available)")
    parser.add_argument("--out", default=None,
                        help="run directory (default runs/<method>-<time>; with --resume, the checkpoint's directory)")
    parser.add_argument("--seed", type=int, default=0, help="seeds init, shuffling and augmentations (not the split)")
    parser.add_argument("--knn-k", type=int, default=20, help="neighbours of the kNN monitor (DINO protocol)")
    parser.add_argument("--knn-temperature", type=float, default=0.07, help="kNN vote weight exp(cos / T)")
    parser.add_argument("--fewshot-shots", type=int, default=1, help="labelled images per class in the few-label kNN bank")
    parser.add_argument("--fewshot-draws", type=int, default=20, help="random few-label banks averaged over")
    parser.add_argument("--probe-iterations", type=int, default=100, help="L-BFGS iterations of the linear probe")
    parser.add_argument("--subset", type=int, default=None, help="use only this many images (quick smoke runs)")
    parser.add_argument("--resume", default=None, metavar="CKPT", help="continue the run saved in this checkpoint.pt")
    parser.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                        help="stop (checkpoint written) after this epoch, as if interrupted; --resume continues")
    parser.add_argument("--no-checkpoint", action="store_true", help="do not write checkpoint.pt")
    parser.add_argument("--no-plots", action="store_true", help="do not write curves.png")
    parser.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                        help="tqdm progress bar per epoch (auto: only on a terminal)")


def check_common(args, split: data_lib.Split) -> None:
    n = split.train_x.shape[0]
    if args.batch_size < 2:
        raise ConfigError(f"--batch-size must be at least 2 (a contrastive batch needs negatives), "
                          f"got {args.batch_size}")
    if args.batch_size > n:
        raise ConfigError(f"--batch-size {args.batch_size} is larger than the training split of --data {split.name} "
                          f"({n} images); use --batch-size {n} or less")
    if args.epochs < 0:
        raise ConfigError(f"--epochs must be >= 0, got {args.epochs}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise ConfigError(f"--lr must be a positive number, got {args.lr}")
    if args.knn_k < 1:
        raise ConfigError(f"--knn-k must be >= 1, got {args.knn_k}")
    if args.fewshot_shots < 1 or args.fewshot_draws < 1 or args.probe_iterations < 1:
        raise ConfigError("--fewshot-shots, --fewshot-draws and --probe-iterations must be >= 1")
    if getattr(args, "compare_repeats", 1) < 1:
        raise ConfigError(f"--compare-repeats must be >= 1, got {args.compare_repeats}")


def check_positive(args, *names) -> None:
    for name in names:
        value = getattr(args, name)
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")


def resolve_device(name) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def load_data(args, device) -> data_lib.Split:
    if args.image_size < 8:
        raise ConfigError(f"--image-size must be >= 8, got {args.image_size}")
    try:
        split = data_lib.load(args.data, device, subset=args.subset, image_size=args.image_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_common(args, split)
    dtype = DTYPES[getattr(args, "dtype", "float32")]
    if dtype != split.train_x.dtype:
        split = dataclasses.replace(split, train_x=split.train_x.to(dtype), test_x=split.test_x.to(dtype))
    return split


# ----------------------------------------------------------------------------------------------- models
class Encoder(nn.Module):
    """Small conv net for C×S×S images -> ``dim``-d representation (what the evaluation looks at).

    GELU rather than ReLU, here and in every head: a ReLU's gradient jumps where its input crosses 0, so a
    float32 rounding difference (1e-7) that moves one input across 0 changes a weight's gradient by about
    1/batch, and ``--impl both`` would then measure those flips (1e-3 loss differences within 50 steps)
    instead of the ops. With a smooth activation fused and reference stay within ~1e-6.
    """

    def __init__(self, dim: int = 64, width: int = 32, image_size: int = 8, in_channels: int = 1):
        super().__init__()

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.GELU()]

        layers = [*block(in_channels, width, 1), *block(width, 2 * width, 2), *block(2 * width, 2 * width, 1)]
        side = (image_size + 1) // 2
        if side > 4:  # larger folder images: pool to 4×4 so the head stays small
            layers.append(nn.AdaptiveAvgPool2d(4))
            side = 4
        self.features = nn.Sequential(*layers)
        # Flatten rather than global-pool: where a stroke is matters for digits.
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * side * side, dim, bias=False), nn.BatchNorm1d(dim),
                                nn.GELU())
        self.dim = dim

    def forward(self, x):
        return self.fc(self.features(x))


def encoder_for(split: data_lib.Split, dim: int = 64) -> Encoder:
    c, h, _ = split.train_x.shape[1:]
    return Encoder(dim=dim, image_size=h, in_channels=c)


def steps_per_epoch(args, split: data_lib.Split) -> int:
    return split.train_x.shape[0] // args.batch_size


def total_steps(args, split: data_lib.Split) -> int:
    """Optimizer steps of the whole run (at least 1: MomentumEncoder schedules need a positive length)."""
    return max(1, args.epochs * steps_per_epoch(args, split))


def mlp_head(in_dim: int, hidden: int, out_dim: int, *, out_bn: bool = False) -> nn.Module:
    """SimCLR-style projection head (also BYOL's projector/predictor); ``out_bn`` adds SimSiam/MoCo v3's output BN."""
    layers = [nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.GELU(),
              nn.Linear(hidden, out_dim, bias=not out_bn)]
    if out_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


class Method(nn.Module):
    """What a trainer file defines. Subclasses set ``self.encoder`` (evaluated unless ``eval_encoder`` is
    overridden) and implement ``training_step``; ``after_step`` runs after the optimizer step (EMA updates).
    ``no_weight_decay`` names parameters AdamW leaves undecayed (CLIP's logit_scale, as OpenCLIP)."""

    no_weight_decay: tuple = ()

    def training_step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        pass

    @property
    def eval_encoder(self) -> nn.Module:
        return self.encoder


# ----------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def embed(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Representations of ``x`` in eval mode (BatchNorm running statistics), restoring the model's mode after."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])
    model.train(was_training)
    return out


@torch.no_grad()
def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor,
                 num_classes: int, *, k: int = 20, temperature: float = 0.07, backend=None) -> float:
    """Weighted kNN top-1 accuracy as in DINO's eval_knn: cosine top-k neighbours vote exp(sim / T) for their class."""
    k = min(k, bank.shape[0])
    sims, idx = sslkernels.knn_topk(query, bank, k=k, normalize=True, backend=backend)
    votes = torch.zeros(query.shape[0], num_classes, device=query.device, dtype=torch.float32)
    votes.scatter_add_(1, bank_labels[idx], (sims.float() / temperature).exp())
    return (votes.argmax(1) == query_labels).float().mean().item()


def fewshot_banks(labels: torch.Tensor, num_classes: int, shots: int, draws: int, seed: int = 1000):
    """``draws`` index sets of ``shots`` train images per class (fewer if a class has fewer), fixed by ``seed``."""
    per_class = [torch.nonzero(labels.cpu() == c).flatten() for c in range(num_classes)]
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([idx[torch.randperm(idx.numel(), generator=g)[:shots]] for idx in per_class]).to(labels.device)
            for _ in range(draws)]


def linear_probe(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, *, weight_decay: float = 1e-4, iterations: int = 100) -> float:
    """Top-1 of a logistic-regression probe on frozen features (deterministic: zero init, full-batch L-BFGS)."""
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    xtr, xte = ((train_f - mean) / std).float(), ((test_f - mean) / std).float()
    w = torch.zeros(xtr.shape[1], num_classes, device=xtr.device, requires_grad=True)
    b = torch.zeros(num_classes, device=xtr.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, train_y) + weight_decay * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return ((xte @ w + b).argmax(1) == test_y).float().mean().item()


def evaluate_features(bank: torch.Tensor, query: torch.Tensor, split: data_lib.Split, args, backend,
                      *, rank: bool = True) -> dict:
    """The whole protocol (module docstring) on given train-split (``bank``) and held-out (``query``) features."""
    kw = dict(k=args.knn_k, temperature=args.knn_temperature, backend=backend)
    n_cls = split.num_classes
    fewshot = [knn_accuracy(bank[i], split.train_y[i], query, split.test_y, n_cls, **kw)
               for i in fewshot_banks(split.train_y, n_cls, args.fewshot_shots, args.fewshot_draws)]
    out = {"knn_top1": knn_accuracy(bank, split.train_y, query, split.test_y, n_cls, **kw),
           "knn_fewshot": sum(fewshot) / len(fewshot),
           "linear_probe": linear_probe(bank, split.train_y, query, split.test_y, n_cls,
                                        iterations=args.probe_iterations)}
    if rank:
        out["rankme"] = float(sslkernels.rankme(bank.float(), backend=backend))
    return out


def evaluate(encoder: nn.Module, split: data_lib.Split, args, backend) -> dict:
    return evaluate_features(embed(encoder, split.train_x), embed(encoder, split.test_x), split, args, backend)


def raw_pixel_baseline(split: data_lib.Split, args, backend) -> dict:
    """The same protocol on raw pixels: the bar a learned representation should clear (digits are easy)."""
    flat = split.train_x.flatten(1)
    mean = flat.mean(0)  # centring makes cosine similarity about shape rather than overall ink
    return evaluate_features(flat - mean, split.test_x.flatten(1) - mean, split, args, backend, rank=False)


# ----------------------------------------------------------------------------------------------- RNG / memory
def rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                      "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                      "gauss": float(np_state["gauss"])},
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    random.setstate(state["python"])


def memory_mb(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak on a GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class backend_scope:
    """Make ``backend`` the process default for ops the trainer cannot pass ``backend=`` to
    (MomentumEncoder.update_ runs ema_update_ with the default); restores the previous default on exit."""

    def __init__(self, backend: str):
        self.backend = backend

    def __enter__(self):
        self.previous = _backends._default
        sslkernels.set_backend(self.backend)

    def __exit__(self, *exc):
        _backends._default = self.previous


# ----------------------------------------------------------------------------------------------- run record
class Run:
    """Timing, console lines, report.json, plots and checkpoints of one training run."""

    def __init__(self, method: str, args, device: torch.device, split: data_lib.Split, out: Path):
        self.method, self.args, self.device, self.out = method, args, device, out
        self.backend = IMPLS[args.impl]
        self.out.mkdir(parents=True, exist_ok=True)
        self.history: list[dict] = []
        self.step_losses: list[float] = []
        raw = raw_pixel_baseline(split, args, self.backend)
        self.report = {
            "method": method,
            "config": {k: v for k, v in vars(args).items() if k != "func"},
            "backend": self.backend,
            "device": str(device),
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else platform.processor() or "cpu"),
            "torch": torch.__version__,
            "sslkernels": sslkernels.__version__,
            "data": split.describe(),
            "evaluation": {
                "knn_top1": f"weighted kNN (DINO eval_knn, k={args.knn_k}, T={args.knn_temperature}), bank = whole "
                            "labelled train split, queries = held-out split",
                "knn_fewshot": f"same kNN with a bank of {args.fewshot_shots} labelled train image(s) per class, mean "
                               f"over {args.fewshot_draws} fixed random banks (label-efficient protocol as in MSN); "
                               "the headline number: with all labels even a random encoder does well on digits",
                "linear_probe": "logistic regression (L-BFGS, standardized features) on the whole labelled train split",
                "rankme": "RankMe effective rank of the train-split embeddings",
                "random_init": "history[0]: the same encoder before any training step (same seed)",
            },
            "raw_pixels": raw,
            "knn_top1_raw_pixels": raw["knn_top1"],
            "history": self.history,
            "step_losses": self.step_losses,
        }
        self.train_seconds = 0.0  # time in training steps only (no evaluation): what --impl both compares
        self.start = time.perf_counter()
        print(f"{method}: data {split.name} ({split.train_x.shape[0]} train / {split.test_x.shape[0]} held out), "
              f"device {device}, impl {args.impl} (backend={self.backend!r}), out {self.out}\n"
              f"raw pixels (reference point): kNN {raw['knn_top1']:.4f}, {args.fewshot_shots}-shot kNN "
              f"{raw['knn_fewshot']:.4f}, linear probe {raw['linear_probe']:.4f}", flush=True)

    def log_epoch(self, epoch: int, metrics: dict, *, loss=None, samples: int = 0, seconds: float = 0.0) -> dict:
        """Record one epoch. ``loss`` is the mean training loss (None for the epoch-0 evaluation before training)."""
        if loss is not None and not math.isfinite(loss):
            self.write()
            raise FloatingPointError(f"training loss became {loss} in epoch {epoch}; try a lower --lr")
        row = {"epoch": epoch, "loss": loss, **metrics,
               "samples_per_s": samples / seconds if seconds > 0 else None,
               "memory_mb": memory_mb(self.device),
               "elapsed_s": self.elapsed()}
        self.history.append(row)
        loss_txt = f"{loss:8.4f}" if loss is not None else "       -"
        speed = f"{row['samples_per_s']:7.0f}" if row["samples_per_s"] else "      -"
        print(f"epoch {epoch:3d}/{self.args.epochs}  loss {loss_txt}  knn {metrics['knn_top1']:.4f}  "
              f"{self.args.fewshot_shots}-shot {metrics['knn_fewshot']:.4f}  probe {metrics['linear_probe']:.4f}  "
              f"rankme {metrics['rankme']:5.1f}  {speed} samples/s  {self.elapsed():6.1f}s", flush=True)
        return row

    def elapsed(self) -> float:
        return self.report.get("resumed_elapsed_s", 0.0) + time.perf_counter() - self.start

    def write(self) -> Path:
        path = self.out / "report.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.report, indent=2, allow_nan=False) + "\n")
        os.replace(tmp, path)  # a crash mid-write never leaves a half report
        return path

    def plot(self) -> Path | None:
        if self.args.no_plots or not self.history:
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ep = [r["epoch"] for r in self.history]
        fig, ax = plt.subplots(1, 3, figsize=(14, 3.8))
        if self.step_losses:
            spe = len(self.step_losses) / max(1, ep[-1])
            ax[0].plot([(i + 1) / spe for i in range(len(self.step_losses))], self.step_losses, lw=0.6, alpha=0.4,
                       label="per step")
        ax[0].plot(ep[1:], [r["loss"] for r in self.history[1:]], "o-", ms=3, label="epoch mean")
        ax[0].set(title=f"{self.method} training loss", xlabel="epoch")
        raw = self.report["raw_pixels"]
        for key, label, color in (("knn_top1", "kNN, all labels", "C0"),
                                  ("knn_fewshot", f"kNN, {self.args.fewshot_shots} label/class", "C1"),
                                  ("linear_probe", "linear probe", "C2")):
            ax[1].plot(ep, [r[key] for r in self.history], "o-", ms=3, color=color, label=label)
            ax[1].axhline(raw[key], color=color, ls=":", lw=1)
        ax[1].set(title="held-out top-1 (dotted: raw pixels; epoch 0: random init)", xlabel="epoch")
        ax[2].plot(ep, [r["rankme"] for r in self.history], "o-", ms=3)
        ax[2].set(title="RankMe of the representation", xlabel="epoch")
        for a in ax:
            a.grid(alpha=0.3)
        ax[0].legend(fontsize=8)
        ax[1].legend(fontsize=8)
        fig.tight_layout()
        path = self.out / "curves.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        self.report["plot"] = str(path)
        return path

    def finish(self, *, complete: bool = True) -> dict:
        first, last = self.history[0], self.history[-1]
        self.report["summary"] = {
            "complete": complete, "epochs_done": last["epoch"],
            "knn_top1_before": first["knn_top1"], "knn_top1_after": last["knn_top1"],
            "knn_fewshot_before": first["knn_fewshot"], "knn_fewshot_after": last["knn_fewshot"],
            "linear_probe_before": first["linear_probe"], "linear_probe_after": last["linear_probe"],
            "rankme_before": first["rankme"], "rankme_after": last["rankme"],
            "knn_top1_raw_pixels": self.report["raw_pixels"]["knn_top1"],
            "knn_fewshot_raw_pixels": self.report["raw_pixels"]["knn_fewshot"],
            "linear_probe_raw_pixels": self.report["raw_pixels"]["linear_probe"],
            "final_loss": last["loss"], "train_seconds": self.train_seconds, "seconds": self.elapsed(),
        }
        self.plot()
        path = self.write()
        raw = self.report["raw_pixels"]
        shots = self.args.fewshot_shots
        print(f"{'done' if complete else 'stopped'} after epoch {last['epoch']}: "
              f"{shots}-shot kNN {first['knn_fewshot']:.4f} random init -> {last['knn_fewshot']:.4f} trained "
              f"(raw pixels {raw['knn_fewshot']:.4f}); all-label kNN {first['knn_top1']:.4f} -> {last['knn_top1']:.4f} "
              f"(raw {raw['knn_top1']:.4f}); linear probe {first['linear_probe']:.4f} -> {last['linear_probe']:.4f}; "
              f"report {path}", flush=True)
        return self.report


# ----------------------------------------------------------------------------------------------- the loop
def _progress(args, total: int, desc: str):
    from tqdm.auto import tqdm

    disable = {"auto": None, "on": False, "off": True}[args.progress]  # None: off when not a terminal
    return tqdm(total=total, desc=desc, leave=False, disable=disable, dynamic_ncols=True)


# Settings a resumed run may change (where it writes, what it shows, the device, the loss backend); every other
# setting (schedule length, batch, seed, data, the method's own options...) must match the checkpoint's run.
_RESUME_MAY_CHANGE = ("out", "resume", "stop_after", "progress", "no_plots", "no_checkpoint", "device", "impl",
                      "compare", "compare_steps", "compare_repeats")
_RESUME_DEFAULTS = {"dtype": "float32"}  # settings older checkpoints did not record


def sync(device: torch.device) -> None:
    """Wait for the GPU (timing); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_method(args, split: data_lib.Split, build, device: torch.device):
    """(method, AdamW over its trainable parameters), in the data's dtype on ``device``."""
    method = build(args, split).to(device=device, dtype=split.train_x.dtype)
    named = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n not in method.no_weight_decay]}]
    undecayed = [p for n, p in named if n in method.no_weight_decay]
    if undecayed:
        groups.append({"params": undecayed, "weight_decay": 0.0})
    return method, torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)


def optimizer_step(method: Method, optimizer, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
    """One step's loss, backward and optimizer update (the caller then steps its scheduler and after_step)."""
    loss = method.training_step(x, y, step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def fit(name: str, args, build) -> dict:
    """Train ``build(args, split) -> Method`` with the shared options; ``--impl both`` compares fused and reference."""
    if args.compare or args.impl == "both":
        return compare(name, args, build)
    device = resolve_device(args.device)
    ckpt = None
    if args.resume:
        if not Path(args.resume).is_file():
            raise ConfigError(f"--resume {args.resume}: no such checkpoint file")
        ckpt = load_checkpoint(args.resume)
        if ckpt["method"] != name:
            raise ConfigError(f"--resume {args.resume} is a {ckpt.get('method')} checkpoint, not {name}")
        config = {k: v for k, v in vars(args).items() if k != "func"}
        ckpt["config"] = {**_RESUME_DEFAULTS, **ckpt["config"]}
        diff = [k for k in sorted(config.keys() | ckpt["config"].keys())
                if k not in _RESUME_MAY_CHANGE and ckpt["config"].get(k) != config.get(k)]
        if diff:
            raise ConfigError("--resume: these settings differ from the checkpoint's run: "
                              + ", ".join(f"--{k.replace('_', '-')} {config.get(k)} (was {ckpt['config'].get(k)})"
                                          for k in diff))
    seed_everything(args.seed)
    split = load_data(args, device)
    if ckpt is not None and "data" in ckpt and ckpt["data"] != split.describe():
        # Same --data, other images: the schedule's length and the held-out split would change under the run.
        was, now = ckpt["data"], split.describe()
        raise ConfigError(f"--resume: --data {args.data} is not the data of the checkpoint's run: "
                          + ", ".join(f"{k} {now.get(k)} (was {was.get(k)})" for k in sorted(was.keys() | now.keys())
                                      if was.get(k) != now.get(k)))
    if args.out:
        out = Path(args.out)
    elif ckpt is not None:
        out = Path(args.resume).parent
    else:
        out = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = Run(name, args, device, split, out)
    backend = run.backend

    with backend_scope(backend):
        method, optimizer = build_method(args, split, build, device)
        loader = data_lib.Shuffler(split.train_x.shape[0], args.batch_size, args.seed, device)
        steps_per_epoch = len(loader)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(args.epochs * steps_per_epoch, 1))
        first_epoch = 1
        if ckpt is None:
            run.log_epoch(0, evaluate(method.eval_encoder, split, args, backend))  # the random-init baseline
        else:
            method.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            loader.load_state_dict(ckpt["loader"])
            run.history.extend(ckpt["history"])
            run.step_losses.extend(ckpt["step_losses"])
            run.train_seconds = ckpt["train_seconds"]
            run.report["resumed_from"] = str(args.resume)
            run.report["resumed_elapsed_s"] = ckpt["history"][-1]["elapsed_s"]
            first_epoch = ckpt["epoch"] + 1
            set_rng_state(ckpt["rng"])  # last: everything above may draw random numbers
            print(f"resumed from {args.resume} after epoch {ckpt['epoch']}", flush=True)

        last_epoch = args.epochs if args.stop_after is None else min(args.epochs, args.stop_after)
        for epoch in range(first_epoch, last_epoch + 1):
            method.train()
            bar = _progress(args, steps_per_epoch, f"{name} epoch {epoch}/{args.epochs}")
            losses = []
            sync(device)
            t0 = time.perf_counter()
            for i, idx in enumerate(loader):
                step = (epoch - 1) * steps_per_epoch + i
                loss = optimizer_step(method, optimizer, split.train_x[idx], split.train_y[idx], step)
                scheduler.step()
                method.after_step(step)
                losses.append(loss.detach())
                if not bar.disable and (device.type == "cpu" or i % 10 == 0):  # .item() waits for the GPU
                    dt = time.perf_counter() - t0
                    bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{(i + 1) * args.batch_size / dt:.0f}",
                                    mem=f"{memory_mb(device):.0f}MB", refresh=False)
                bar.update()
            sync(device)
            seconds = time.perf_counter() - t0
            bar.close()
            run.train_seconds += seconds
            epoch_losses = torch.stack(losses).tolist()
            run.step_losses.extend(epoch_losses)
            run.log_epoch(epoch, evaluate(method.eval_encoder, split, args, backend),
                          loss=sum(epoch_losses) / len(epoch_losses), samples=len(losses) * args.batch_size,
                          seconds=seconds)
            if not args.no_checkpoint:
                save_checkpoint(run, epoch, method, optimizer, scheduler, loader)
            run.write()
    return run.finish(complete=last_epoch == args.epochs)


_CHECKPOINT_KEYS = ("method", "epoch", "config", "model", "optimizer", "scheduler", "loader", "rng", "history",
                    "step_losses", "train_seconds")


def load_checkpoint(path) -> dict:
    """A checkpoint written by ``save_checkpoint``, every tensor on the CPU: the RNG states must stay there
    (torch refuses a CUDA ByteTensor as a generator state), and load_state_dict moves the rest where it belongs."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a file that is not a checkpoint
        raise ConfigError(f"--resume {path}: not a checkpoint of sslkernels.train ({type(e).__name__}: {e})") from None
    missing = [k for k in _CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(_CHECKPOINT_KEYS)
    if missing:
        raise ConfigError(f"--resume {path}: not a checkpoint of sslkernels.train (no {', '.join(missing)}); "
                          "resume from the checkpoint.pt a run writes in its output folder")
    return ckpt


def save_checkpoint(run: Run, epoch: int, method: Method, optimizer, scheduler, loader) -> Path:
    """Everything a resumed run needs to continue bit for bit (on CPU): weights, EMA teacher, queue and pointer,
    DINO center (all in ``model``), optimizer, schedule, shuffling generator and the global RNGs."""
    payload = {"method": run.method, "epoch": epoch, "config": run.report["config"],
               "encoder": method.eval_encoder.state_dict(),  # usable on its own: core.Encoder().load_state_dict
               "model": method.state_dict(), "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "loader": loader.state_dict(), "rng": rng_state(),
               "history": list(run.history), "step_losses": list(run.step_losses),
               "train_seconds": run.train_seconds, "data": run.report["data"]}
    path = run.out / "checkpoint.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    run.report["checkpoint"] = str(path)
    return path


def _interleaved_step_seconds(args, build, steps: int) -> dict:
    """Median seconds of one training step (forward, backward, optimizer, after_step) per impl, the two
    stepping alternately in one process.

    Whole runs taken one after another also measure whatever else the machine did meanwhile (on a shared
    2-core box that moves a 2-second run by ±10%, more than the ops' difference); alternating single steps
    puts such load on both impls alike. Models start from the same seed; the numbers are not compared.
    """
    device = resolve_device(args.device)
    split = load_data(args, device)
    models = {}
    for impl in ("fused", "reference"):
        sub = argparse.Namespace(**{**vars(args), "impl": impl})
        seed_everything(args.seed)
        with backend_scope(IMPLS[impl]):
            method, optimizer = build_method(sub, split, build, device)
        models[impl] = (method.train(), optimizer)
    loader = data_lib.Shuffler(split.train_x.shape[0], args.batch_size, args.seed, device)
    seconds: dict = {impl: [] for impl in models}
    warmup, step = 3, 0
    while step < steps + warmup:
        for idx in loader:
            for impl in (("fused", "reference") if step % 2 == 0 else ("reference", "fused")):
                method, optimizer = models[impl]
                with backend_scope(IMPLS[impl]):
                    sync(device)
                    t0 = time.perf_counter()
                    optimizer_step(method, optimizer, split.train_x[idx], split.train_y[idx], step)
                    method.after_step(step)
                    sync(device)
                    if step >= warmup:
                        seconds[impl].append(time.perf_counter() - t0)
            step += 1
            if step >= steps + warmup:
                break
    return {impl: statistics.median(v) for impl, v in seconds.items()}


def compare(name: str, args, build) -> dict:
    """Run ``--impl fused`` and ``--impl reference`` with the same seed; print speedup and loss-curve agreement.

    Each impl trains ``--compare-repeats`` times, alternating (fused, reference, fused, ...), so that load from
    other processes falls on both; the times compared are the medians. Repeats of one impl must reproduce its
    losses bit for bit (the runs are deterministic on CPU); the result records whether they did.
    """
    base = Path(args.out) if args.out else Path("runs") / f"{name}-compare-{time.strftime('%Y%m%d-%H%M%S')}"
    repeats = getattr(args, "compare_repeats", 1)
    reports: dict = {"fused": [], "reference": []}
    for r in range(repeats):
        for impl in ("fused", "reference"):  # fused first: any warm-up cost (first allocations) is charged to it
            out = base / impl if r == 0 else base / f"{impl}-repeat{r}"
            sub = argparse.Namespace(**{**vars(args), "impl": impl, "compare": False, "out": str(out),
                                        "no_plots": args.no_plots or r > 0})
            reports[impl].append(fit(name, sub, build))
    f, r = reports["fused"][0]["step_losses"], reports["reference"][0]["step_losses"]
    n = min(args.compare_steps, len(f), len(r))

    def rel(a, b):
        return abs(a - b) / max(abs(b), 1e-12)

    seconds = {k: [v["summary"]["train_seconds"] for v in runs] for k, runs in reports.items()}
    t = {k: statistics.median(v) for k, v in seconds.items()}
    result = {
        "method": name, "dtype": getattr(args, "dtype", "float32"), "steps_compared": n,
        "max_rel_loss_diff": max((rel(a, b) for a, b in zip(f[:n], r[:n])), default=0.0),
        "max_rel_loss_diff_all_steps": max((rel(a, b) for a, b in zip(f, r)), default=0.0),
        "repeats": repeats,
        "repeats_reproduce_losses": all(run["step_losses"] == runs[0]["step_losses"]
                                        for runs in reports.values() for run in runs),
        "train_seconds": t,
        "train_seconds_each_run": seconds,
        "final": {k: {m: v[0]["summary"][m] for m in ("knn_fewshot_after", "knn_top1_after", "linear_probe_after")}
                  for k, v in reports.items()},
    }
    result["speedup"] = t["reference"] / t["fused"] if t["fused"] > 0 else None
    steps = _interleaved_step_seconds(args, build, max(args.compare_steps, 1))
    result["step_seconds_interleaved"] = steps
    result["speedup_interleaved"] = steps["reference"] / steps["fused"] if steps["fused"] > 0 else None
    base.mkdir(parents=True, exist_ok=True)
    (base / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{name} fused vs reference ({result['dtype']}): training {t['fused']:.2f}s vs {t['reference']:.2f}s "
          f"(median of {repeats}; speedup {result['speedup']:.2f}x; per step, interleaved: "
          f"{1e3 * steps['fused']:.1f} vs {1e3 * steps['reference']:.1f} ms, {result['speedup_interleaved']:.2f}x); "
          f"max relative loss difference over the first "
          f"{n} steps {result['max_rel_loss_diff']:.2e} (all {len(f)} steps: "
          f"{result['max_rel_loss_diff_all_steps']:.2e}); {base / 'compare.json'}", flush=True)
    return result
