"""MoCo v3 (Chen, Xie & He 2021) with sslkernels.info_nce: no queue, symmetric in-batch contrast.

    python -m sslkernels.train mocov3

Encoder + projector + predictor on both views; a momentum copy of encoder + projector gives the keys.
loss = ctr(q1, k2) + ctr(q2, k1), ctr = InfoNCE with in-batch negatives scaled by 2τ (as the official code).
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

import sslkernels
from . import core
from .data import Augment

HELP = "MoCo v3: predictor + momentum encoder, symmetric InfoNCE over the batch (sslkernels.info_nce)"


def add_arguments(parser) -> None:
    core.add_common_arguments(parser, epochs=80, batch_size=256, lr=2e-3)
    parser.add_argument("--temperature", type=float, default=0.2, help="InfoNCE temperature")
    parser.add_argument("--momentum", type=float, default=0.99, help="start of the cosine momentum schedule (to 1)")
    parser.add_argument("--proj-dim", type=int, default=32, help="output size of projector and predictor")


class MoCoV3(core.Method):
    def __init__(self, args, split, steps: int):
        super().__init__()
        self.args, self.backend = args, core.IMPLS[args.impl]
        self.encoder = core.encoder_for(split)
        self.base = nn.Sequential(self.encoder, core.mlp_head(self.encoder.dim, 128, args.proj_dim, out_bn=True))
        self.predictor = core.mlp_head(args.proj_dim, 128, args.proj_dim)
        self.momentum = sslkernels.MomentumEncoder(self.base, args.momentum, total_steps=steps)
        self.augment = Augment()

    def ctr(self, q, k):
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        return sslkernels.info_nce(q, k, temperature=self.args.temperature, backend=self.backend) * (
            2 * self.args.temperature)

    def training_step(self, x, y, step):
        x1, x2 = self.augment(x), self.augment(x)
        q1, q2 = self.predictor(self.base(x1)), self.predictor(self.base(x2))
        self.momentum.update_(self.base, step)  # official order: momentum update, then the keys
        k1, k2 = self.momentum(x1), self.momentum(x2)
        return self.ctr(q1, k2) + self.ctr(q2, k1)


def train(args) -> dict:
    core.check_positive(args, "temperature")
    return core.fit("mocov3", args, lambda a, split: MoCoV3(a, split, core.total_steps(a, split)))
