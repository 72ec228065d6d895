"""Supervised contrastive learning (Khosla et al. 2020) with sslkernels.supcon_loss.

    python -m sslkernels.train supcon

Like SimCLR, but every view of every image with the same label is a positive (this one uses the labels; it
is the supervised upper reference for the self-supervised methods).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import sslkernels
from . import core
from .data import Augment

HELP = "SupCon: supervised contrastive loss over two views per image (sslkernels.supcon_loss; uses labels)"


def add_arguments(parser) -> None:
    core.add_common_arguments(parser, epochs=30, batch_size=256, lr=2e-3)
    parser.add_argument("--temperature", type=float, default=0.1, help="SupCon temperature")
    parser.add_argument("--proj-dim", type=int, default=32, help="output size of the projection head")


class SupCon(core.Method):
    def __init__(self, args, split):
        super().__init__()
        self.args, self.backend = args, core.IMPLS[args.impl]
        self.encoder = core.encoder_for(split)
        self.head = core.mlp_head(self.encoder.dim, 128, args.proj_dim)
        self.augment = Augment()

    def training_step(self, x, y, step):
        views = torch.cat([self.augment(x), self.augment(x)])
        z = F.normalize(self.head(self.encoder(views)), dim=1)
        return sslkernels.supcon_loss(z, torch.cat([y, y]), temperature=self.args.temperature, backend=self.backend)


def train(args) -> dict:
    core.check_positive(args, "temperature")
    return core.fit("supcon", args, SupCon)
