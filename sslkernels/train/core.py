"""The small shared core of the reference trainers: CLI options, encoder, kNN monitor, logging, checkpoint.

A trainer (one file per method, e.g. simclr.py) builds its models, then runs a plain loop over
``batches(...)``; this module keeps what every method repeats so that loop stays short enough to copy.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import sslkernels
from . import data as data_lib

IMPLS = {"fused": "auto", "reference": "torch"}  # --impl -> the backend= passed to every sslkernels op


class ConfigError(ValueError):
    """A bad command-line setting; the CLI prints it as an error message instead of a traceback."""


# ----------------------------------------------------------------------------------------------- options
def add_common_arguments(parser: argparse.ArgumentParser, *, epochs: int, batch_size: int, lr: float) -> None:
    """Options every method shares; each method passes the defaults that suit it."""
    parser.add_argument("--data", choices=data_lib.DATASETS, default="digits",
                        help="digits: scikit-learn's 1797 8x8 handwritten digits (bundled, no download); "
                             "synthetic: generated digit-like blobs (no scikit-learn needed)")
    parser.add_argument("--impl", choices=sorted(IMPLS), default="fused",
                        help="fused: sslkernels ops with backend='auto'; reference: backend='torch' (eager oracle)")
    parser.add_argument("--epochs", type=int, default=epochs, help="passes over the training split (0: only evaluate)")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="images per step (each gives 2 views)")
    parser.add_argument("--lr", type=float, default=lr, help="AdamW peak learning rate (cosine decay to 0)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default=None, help="run directory for report.json (default runs/<method>-<time>)")
    parser.add_argument("--seed", type=int, default=0, help="seeds init, shuffling and augmentations (not the split)")
    parser.add_argument("--knn-k", type=int, default=20, help="neighbours of the kNN monitor (DINO protocol)")
    parser.add_argument("--knn-temperature", type=float, default=0.07, help="kNN vote weight exp(cos / T)")
    parser.add_argument("--subset", type=int, default=None, help="use only this many images (quick smoke runs)")
    parser.add_argument("--no-checkpoint", action="store_true", help="do not write checkpoint.pt")


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
    try:
        split = data_lib.load(args.data, device, subset=args.subset)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_common(args, split)
    return split


# ----------------------------------------------------------------------------------------------- models
class Encoder(nn.Module):
    """Small conv net for 1×8×8 images -> ``dim``-d representation (what the kNN monitor evaluates)."""

    def __init__(self, dim: int = 64, width: int = 32, image_size: int = 8):
        super().__init__()

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*block(1, width, 1), *block(width, 2 * width, 2), *block(2 * width, 2 * width, 1))
        # Flatten rather than global-pool: where a stroke is matters for digits.
        flat = 2 * width * ((image_size + 1) // 2) ** 2
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(flat, dim, bias=False), nn.BatchNorm1d(dim),
                                nn.ReLU(inplace=True))
        self.dim = dim

    def forward(self, x):
        return self.fc(self.features(x))


def mlp_head(in_dim: int, hidden: int, out_dim: int) -> nn.Module:
    """SimCLR-style projection head (also the shape of BYOL's projector/predictor)."""
    return nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


# ----------------------------------------------------------------------------------------------- loop helpers
def batches(n: int, batch_size: int, device):
    """Index tensors of one shuffled epoch; the last incomplete batch is dropped (BatchNorm and the loss
    both want full batches)."""
    perm = torch.randperm(n, device=device)
    for start in range(0, n - batch_size + 1, batch_size):
        yield perm[start:start + batch_size]


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


def evaluate(encoder: nn.Module, split: data_lib.Split, args, backend) -> dict:
    """kNN monitor on the held-out split (bank = train-split representations) and RankMe of the bank."""
    bank = embed(encoder, split.train_x)
    query = embed(encoder, split.test_x)
    acc = knn_accuracy(bank, split.train_y, query, split.test_y, split.num_classes, k=args.knn_k,
                       temperature=args.knn_temperature, backend=backend)
    return {"knn_top1": acc, "rankme": float(sslkernels.rankme(bank.float(), backend=backend))}


def pixel_knn_accuracy(split: data_lib.Split, args, backend) -> float:
    """The same kNN monitor on raw pixels: the bar a learned representation should clear (digits are easy)."""
    flat = split.train_x.flatten(1)
    mean = flat.mean(0)  # centring makes cosine similarity about shape rather than overall ink
    return knn_accuracy(flat - mean, split.train_y, split.test_x.flatten(1) - mean, split.test_y, split.num_classes,
                        k=args.knn_k, temperature=args.knn_temperature, backend=backend)


# ----------------------------------------------------------------------------------------------- run record
class Run:
    """Timing, per-epoch console lines, report.json and checkpoint of one training run."""

    def __init__(self, method: str, args, device: torch.device, split: data_lib.Split):
        self.method = method
        self.args = args
        self.device = device
        self.backend = IMPLS[args.impl]
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.out = Path(args.out) if args.out else Path("runs") / f"{method}-{stamp}"
        self.out.mkdir(parents=True, exist_ok=True)
        self.history: list[dict] = []
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
            "knn_top1_raw_pixels": pixel_knn_accuracy(split, args, self.backend),
            "history": self.history,
        }
        self.start = time.perf_counter()
        print(f"{method}: data {split.name} ({split.train_x.shape[0]} train / {split.test_x.shape[0]} held out), "
              f"device {device}, impl {args.impl} (backend={self.backend!r}), out {self.out}\n"
              f"kNN top-1 on raw pixels (reference point): {self.report['knn_top1_raw_pixels']:.4f}", flush=True)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def log_epoch(self, epoch: int, metrics: dict, *, loss=None, samples: int = 0, seconds: float = 0.0) -> dict:
        """Record one epoch. ``loss`` is the mean training loss (None for the epoch-0 evaluation before training)."""
        if loss is not None and not math.isfinite(loss):
            self.write()
            raise FloatingPointError(f"training loss became {loss} in epoch {epoch}; try a lower --lr")
        row = {"epoch": epoch, "loss": loss, **metrics,
               "samples_per_s": samples / seconds if seconds > 0 else None,
               "elapsed_s": time.perf_counter() - self.start}
        self.history.append(row)
        loss_txt = f"{loss:8.4f}" if loss is not None else "       -"
        speed = f"{row['samples_per_s']:8.0f}" if row["samples_per_s"] else "       -"
        print(f"epoch {epoch:3d}/{self.args.epochs}  loss {loss_txt}  knn@{self.args.knn_k} {metrics['knn_top1']:.4f}  "
              f"rankme {metrics['rankme']:5.1f}  {speed} samples/s  elapsed {row['elapsed_s']:6.1f}s", flush=True)
        return row

    def save_checkpoint(self, epoch: int, **state) -> None:
        """``state``: name -> module / optimizer (anything with state_dict()) or plain value."""
        if self.args.no_checkpoint:
            return
        payload = {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in state.items()}
        payload.update(epoch=epoch, method=self.method, config=self.report["config"])
        torch.save(payload, self.out / "checkpoint.pt")
        self.report["checkpoint"] = str(self.out / "checkpoint.pt")

    def write(self) -> Path:
        path = self.out / "report.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.report, indent=2, allow_nan=False) + "\n")
        os.replace(tmp, path)  # a crash mid-write never leaves a half report
        return path

    def finish(self) -> dict:
        first, last = self.history[0], self.history[-1]
        self.report["summary"] = {
            "knn_top1_before": first["knn_top1"], "knn_top1_after": last["knn_top1"],
            "rankme_before": first["rankme"], "rankme_after": last["rankme"],
            "knn_top1_raw_pixels": self.report["knn_top1_raw_pixels"],
            "final_loss": last["loss"], "seconds": time.perf_counter() - self.start,
        }
        path = self.write()
        print(f"kNN top-1 {first['knn_top1']:.4f} before training -> {last['knn_top1']:.4f} after "
              f"(raw pixels {self.report['knn_top1_raw_pixels']:.4f}); report {path}", flush=True)
        return self.report
