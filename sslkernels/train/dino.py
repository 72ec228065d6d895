"""DINO (Caron et al. 2021) with sslkernels.dino_loss and update_center_: self-distillation with multi-crop.

    python -m sslkernels.train dino

The student sees 2 global and ``--local-crops`` local crops (zoomed-in windows; on 8×8 digits they keep the
8×8 size), the EMA teacher only the global ones. The teacher's outputs are centred (a running mean kept by
update_center_) and sharpened by a temperature that warms up from ``--warmup-teacher-temp`` to ``--teacher-temp``
(both 0.04 by default, the paper's default); the student matches them across different crops. The teacher's
backbone is what gets evaluated, as in the paper.

Small-scale choices (digits, batch 128, 256 prototypes): the head's MLP has BatchNorm (the official head's
``use_bn`` option) and DINO's init (trunc-normal weights, zero biases), and the center follows the batch mean with
momentum 0.95 instead of 0.9. Without them the teacher's outputs barely vary across images and the run collapses
to a uniform distribution (loss stuck at log P) within a few epochs.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import sslkernels
from . import core
from .data import Augment

HELP = "DINO: multi-crop self-distillation with centering and teacher-temperature warm-up (sslkernels.dino_loss)"


def add_arguments(parser) -> None:
    core.add_common_arguments(parser, epochs=100, batch_size=128, lr=1e-3, weight_decay=0.04)
    parser.add_argument("--out-dim", type=int, default=256, help="prototypes P of the DINO head")
    parser.add_argument("--local-crops", type=int, default=4, help="local crops per image (besides 2 global ones)")
    parser.add_argument("--student-temp", type=float, default=0.1, help="student softmax temperature")
    parser.add_argument("--warmup-teacher-temp", type=float, default=0.04, help="teacher temperature at step 0")
    parser.add_argument("--teacher-temp", type=float, default=0.04, help="teacher temperature after warm-up")
    parser.add_argument("--warmup-teacher-temp-epochs", type=int, default=10, help="linear warm-up length")
    parser.add_argument("--momentum", type=float, default=0.99, help="start of the cosine teacher momentum (to 1)")
    parser.add_argument("--center-momentum", type=float, default=0.95, help="EMA of the teacher-output center")


class DINOHead(nn.Module):
    """MLP (with BN) -> bottleneck -> L2-normalize -> weight-normalized prototypes (g fixed to 1: norm_last_layer)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 128, bottleneck: int = 32):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(nn.init.trunc_normal_(torch.empty(out_dim, bottleneck), std=0.02))
        for layer in self.mlp:  # the official init (PyTorch's default biases give every image the same offset)
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    def forward(self, x):
        return F.linear(F.normalize(self.mlp(x), dim=1), F.normalize(self.prototypes, dim=1))


class DINO(core.Method):
    def __init__(self, args, split, steps_per_epoch: int):
        super().__init__()
        self.args, self.backend = args, core.IMPLS[args.impl]
        self.encoder = core.encoder_for(split)
        self.student = nn.Sequential(self.encoder, DINOHead(self.encoder.dim, args.out_dim))
        self.teacher = sslkernels.MomentumEncoder(self.student, args.momentum,
                                                  total_steps=max(1, args.epochs * steps_per_epoch))
        self.register_buffer("center", torch.zeros(1, args.out_dim))
        self.global_crop = Augment(scale=(0.75, 1.1))
        self.local_crop = Augment(scale=(0.4, 0.6), erase_p=0.0)  # a window of 40-60% of the side, magnified
        warmup = args.warmup_teacher_temp_epochs * steps_per_epoch
        self.teacher_temp = lambda step: (args.warmup_teacher_temp + (args.teacher_temp - args.warmup_teacher_temp)
                                          * min(1.0, step / warmup) if warmup > 0 else args.teacher_temp)

    @property
    def eval_encoder(self):
        return self.teacher.module[0]

    def training_step(self, x, y, step):
        globals_ = torch.cat([self.global_crop(x), self.global_crop(x)])  # crop-major: [crop 0 batch, crop 1 batch]
        teacher_out = self.teacher(globals_)
        student_out = self.student(globals_)
        if self.args.local_crops:
            locals_ = torch.cat([self.local_crop(x) for _ in range(self.args.local_crops)])
            student_out = torch.cat([student_out, self.student(locals_)])
        loss = sslkernels.dino_loss(student_out, teacher_out, self.center, student_temp=self.args.student_temp,
                                    teacher_temp=self.teacher_temp(step), n_global_crops=2, backend=self.backend)
        sslkernels.update_center_(self.center, teacher_out, self.args.center_momentum, backend=self.backend)
        return loss

    def after_step(self, step):
        self.teacher.update_(self.student, step)


def train(args) -> dict:
    core.check_positive(args, "student_temp", "teacher_temp", "warmup_teacher_temp", "out_dim")
    if args.local_crops < 0:
        raise core.ConfigError(f"--local-crops must be >= 0, got {args.local_crops}")
    return core.fit("dino", args, lambda a, split: DINO(a, split, core.steps_per_epoch(a, split)))
