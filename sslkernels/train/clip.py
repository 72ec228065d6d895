"""CLIP (Radford et al. 2021) with sslkernels.clip_loss: two different encoders over paired views.

    python -m sslkernels.train clip

Each image gives a pair: an augmented 8×8 view for the image tower (the conv encoder that gets evaluated) and a
"caption" for the text tower, a coarse 4×4 summary of another view read by an MLP, standing in for a second
modality. Embeddings are L2-normalized; the learnable temperature is exp(logit_scale), clamped to [1, 100] after
each optimizer step and free of weight decay, as OpenCLIP's training loop does (a clamp inside the forward would
pass no gradient once the scale reaches 100, freezing it there).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import sslkernels
from . import core
from .data import Augment

HELP = "CLIP: symmetric image/'caption' contrast between two encoders (sslkernels.clip_loss)"


def add_arguments(parser) -> None:
    core.add_common_arguments(parser, epochs=30, batch_size=256, lr=2e-3)
    parser.add_argument("--embed-dim", type=int, default=32, help="joint embedding size")
    parser.add_argument("--init-temperature", type=float, default=0.07, help="initial 1 / exp(logit_scale)")


class CaptionTower(nn.Module):
    """The 'text' encoder: an MLP over a 4×4 average-pooled view (a coarse description of the image)."""

    def __init__(self, channels: int, dim: int, hidden: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(16 * channels, hidden), nn.BatchNorm1d(hidden),
                                 nn.GELU(), nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden),
                                 nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        return self.mlp(F.adaptive_avg_pool2d(x, 4))


class CLIP(core.Method):
    no_weight_decay = ("logit_scale",)

    def __init__(self, args, split):
        super().__init__()
        self.backend = core.IMPLS[args.impl]
        self.encoder = core.encoder_for(split)
        self.image_proj = nn.Linear(self.encoder.dim, args.embed_dim, bias=False)
        self.text_tower = CaptionTower(split.train_x.shape[1], args.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / args.init_temperature)))
        self.augment = Augment()

    def training_step(self, x, y, step):
        image = F.normalize(self.image_proj(self.encoder(self.augment(x))), dim=1)
        text = F.normalize(self.text_tower(self.augment(x)), dim=1)
        return sslkernels.clip_loss(image, text, self.logit_scale.exp(), backend=self.backend)

    @torch.no_grad()
    def after_step(self, step):
        self.logit_scale.clamp_(0, math.log(100))


def train(args) -> dict:
    core.check_positive(args, "init_temperature")
    return core.fit("clip", args, CLIP)
