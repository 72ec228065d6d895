"""SimCLR (Chen et al. 2020) with sslkernels.nt_xent as the loss.

    python -m sslkernels.train simclr [--impl reference]   # reference: the same loop through the eager ops

Two augmented views per image -> encoder -> projection head -> L2-normalize -> NT-Xent over the 2N views.
The evaluation looks at the encoder's representation (before the head), as the SimCLR paper does.
"""
from __future__ import annotations

import torch.nn.functional as F

import sslkernels
from . import core
from .data import Augment

HELP = "SimCLR: NT-Xent between two augmented views (sslkernels.nt_xent)"


def add_arguments(parser) -> None:
    core.add_common_arguments(parser, epochs=30, batch_size=256, lr=2e-3)
    parser.add_argument("--temperature", type=float, default=0.5, help="NT-Xent temperature")
    parser.add_argument("--proj-dim", type=int, default=32, help="output size of the projection head")


class SimCLR(core.Method):
    def __init__(self, args, split):
        super().__init__()
        self.args, self.backend = args, core.IMPLS[args.impl]
        self.encoder = core.encoder_for(split)
        self.head = core.mlp_head(self.encoder.dim, 128, args.proj_dim)
        self.augment = Augment()

    def training_step(self, x, y, step):
        z1 = F.normalize(self.head(self.encoder(self.augment(x))), dim=1)
        z2 = F.normalize(self.head(self.encoder(self.augment(x))), dim=1)
        return sslkernels.nt_xent(z1, z2, temperature=self.args.temperature, backend=self.backend)


def train(args) -> dict:
    core.check_positive(args, "temperature")
    return core.fit("simclr", args, SimCLR)
