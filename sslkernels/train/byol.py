"""BYOL (Grill et al. 2020) with sslkernels.negative_cosine_similarity and MomentumEncoder.

    python -m sslkernels.train byol

The online network (encoder + projector + predictor) predicts the target network's projection of the other
view; the target is an EMA of encoder + projector, momentum following BYOL's cosine schedule to 1.
"""
from __future__ import annotations

import torch.nn as nn

import sslkernels
from . import core
from .data import Augment

HELP = "BYOL: online predictor regresses an EMA target (sslkernels.negative_cosine_similarity, MomentumEncoder)"


def add_arguments(parser) -> None:
    core.add_common_arguments(parser, epochs=100, batch_size=256, lr=2e-3)
    parser.add_argument("--momentum", type=float, default=0.99, help="start of the cosine momentum schedule (to 1)")
    parser.add_argument("--proj-dim", type=int, default=32, help="output size of projector and predictor")


class BYOL(core.Method):
    def __init__(self, args, split, steps: int):
        super().__init__()
        self.backend = core.IMPLS[args.impl]
        self.encoder = core.encoder_for(split)
        self.online = nn.Sequential(self.encoder, core.mlp_head(self.encoder.dim, 128, args.proj_dim))
        self.predictor = core.mlp_head(args.proj_dim, 128, args.proj_dim)
        self.target = sslkernels.MomentumEncoder(self.online, args.momentum, total_steps=steps)
        self.augment = Augment()

    def training_step(self, x, y, step):
        x1, x2 = self.augment(x), self.augment(x)
        p1, p2 = self.predictor(self.online(x1)), self.predictor(self.online(x2))
        t1, t2 = self.target(x1), self.target(x2)
        # BYOL's 2 - 2cos summed over both directions, up to a constant: −cos(p1, t2) − cos(p2, t1).
        return (sslkernels.negative_cosine_similarity(p1, t2, backend=self.backend)
                + sslkernels.negative_cosine_similarity(p2, t1, backend=self.backend))

    def after_step(self, step):
        self.target.update_(self.online, step)


def train(args) -> dict:
    return core.fit("byol", args, lambda a, split: BYOL(a, split, core.total_steps(a, split)))
