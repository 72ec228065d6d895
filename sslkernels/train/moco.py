"""MoCo v2 (He et al. 2020; Chen et al. 2020) with sslkernels.moco_loss, MemoryQueue and MomentumEncoder.

    python -m sslkernels.train moco

The query encoder (+ MLP head) sees one view; a momentum copy of it (the key encoder) sees the other; each
query's positive is its key and the negatives are a queue of keys from earlier batches. The queue pointer
lives on the device, so a step never waits on the host.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

import sslkernels
from . import core
from .data import Augment

HELP = "MoCo v2: momentum key encoder + queue of negatives (sslkernels.moco_loss, MemoryQueue)"


def add_arguments(parser) -> None:
    core.add_common_arguments(parser, epochs=30, batch_size=256, lr=2e-3)
    parser.add_argument("--temperature", type=float, default=0.2, help="InfoNCE temperature")
    parser.add_argument("--queue-size", type=int, default=1024, help="negatives kept in the queue")
    parser.add_argument("--momentum", type=float, default=0.99, help="key-encoder EMA momentum (constant)")
    parser.add_argument("--proj-dim", type=int, default=32, help="output size of the projection head")


class MoCo(core.Method):
    def __init__(self, args, split):
        super().__init__()
        self.args, self.backend = args, core.IMPLS[args.impl]
        self.encoder = core.encoder_for(split)
        self.query_net = nn.Sequential(self.encoder, core.mlp_head(self.encoder.dim, 128, args.proj_dim))
        self.key_net = sslkernels.MomentumEncoder(self.query_net, args.momentum, schedule="constant")
        self.queue = sslkernels.MemoryQueue(args.queue_size, args.proj_dim)
        self.augment = Augment()
        self.keys = None  # this step's keys, enqueued in after_step

    def training_step(self, x, y, step):
        self.key_net.update_(self.query_net)  # MoCo updates the key encoder before computing the keys
        q = F.normalize(self.query_net(self.augment(x)), dim=1)
        k = F.normalize(self.key_net(self.augment(x)), dim=1)  # no_grad inside MomentumEncoder
        self.keys = k
        return sslkernels.moco_loss(q, k, self.queue.queue, temperature=self.args.temperature, backend=self.backend)

    def after_step(self, step):
        # After backward: the loss may have saved the queue for its gradient, so it must not change before then;
        # and this batch's keys are not its own negatives.
        self.queue.enqueue_(self.keys, backend=self.backend)
        self.keys = None


def train(args) -> dict:
    core.check_positive(args, "temperature", "queue_size")
    return core.fit("moco", args, MoCo)
