"""SimSiam (Chen & He 2021) with sslkernels.negative_cosine_similarity: BYOL without the momentum encoder.

    python -m sslkernels.train simsiam

One network (encoder + projector with output BN) on both views, a predictor on top; the stop-gradient on the
other branch's projection (inside negative_cosine_similarity) is what prevents collapse.
"""
from __future__ import annotations

import torch.nn as nn

import sslkernels
from . import core
from .data import Augment

HELP = "SimSiam: predictor + stop-gradient, no negatives, no EMA (sslkernels.negative_cosine_similarity)"


def add_arguments(parser) -> None:
    core.add_common_arguments(parser, epochs=100, batch_size=256, lr=2e-3)
    parser.add_argument("--proj-dim", type=int, default=64, help="output size of projector and predictor")


class SimSiam(core.Method):
    def __init__(self, args, split):
        super().__init__()
        self.backend = core.IMPLS[args.impl]
        self.encoder = core.encoder_for(split)
        self.net = nn.Sequential(self.encoder, core.mlp_head(self.encoder.dim, 128, args.proj_dim, out_bn=True))
        self.predictor = core.mlp_head(args.proj_dim, args.proj_dim // 2, args.proj_dim)  # bottleneck, as in the paper
        self.augment = Augment()

    def training_step(self, x, y, step):
        z1, z2 = self.net(self.augment(x)), self.net(self.augment(x))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return 0.5 * (sslkernels.negative_cosine_similarity(p1, z2, backend=self.backend)
                      + sslkernels.negative_cosine_similarity(p2, z1, backend=self.backend))


def train(args) -> dict:
    return core.fit("simsiam", args, SimSiam)
