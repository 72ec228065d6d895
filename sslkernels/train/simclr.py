"""SimCLR (Chen et al. 2020) on tiny images, with sslkernels.nt_xent as the loss.

    python -m sslkernels.train simclr --epochs 100 --impl fused

Two augmented views per image -> encoder -> projection head -> L2-normalize -> NT-Xent over the 2N views.
The kNN monitor evaluates the encoder's representation (before the head), as the SimCLR paper does.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import sslkernels
from . import core
from .data import Augment

HELP = "SimCLR: NT-Xent between two augmented views (sslkernels.nt_xent)"


def add_arguments(parser) -> None:
    core.add_common_arguments(parser, epochs=100, batch_size=256, lr=2e-3)
    parser.add_argument("--temperature", type=float, default=0.5, help="NT-Xent temperature")
    parser.add_argument("--proj-dim", type=int, default=32, help="output size of the projection head")


def train(args) -> dict:
    if not args.temperature > 0:
        raise core.ConfigError(f"--temperature must be positive, got {args.temperature}")
    device = core.resolve_device(args.device)
    core.seed_everything(args.seed)
    split = core.load_data(args, device)
    run = core.Run("simclr", args, device, split)
    backend = run.backend

    encoder = core.Encoder(dim=64).to(device)
    head = core.mlp_head(encoder.dim, 128, args.proj_dim).to(device)
    params = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    steps = args.epochs * (split.train_x.shape[0] // args.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    augment = Augment()

    run.log_epoch(0, core.evaluate(encoder, split, args, backend))  # the random-init baseline
    for epoch in range(1, args.epochs + 1):
        t0, seen = time.perf_counter(), 0
        loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
        n_steps = 0
        for idx in core.batches(split.train_x.shape[0], args.batch_size, device):
            x = split.train_x[idx]
            z1 = F.normalize(head(encoder(augment(x))), dim=1)
            z2 = F.normalize(head(encoder(augment(x))), dim=1)
            loss = sslkernels.nt_xent(z1, z2, temperature=args.temperature, backend=backend)

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach()
            n_steps += 1
            seen += x.shape[0]
        run.sync()
        seconds = time.perf_counter() - t0
        run.log_epoch(epoch, core.evaluate(encoder, split, args, backend), loss=(loss_sum / n_steps).item(),
                      samples=seen, seconds=seconds)

    run.save_checkpoint(args.epochs, encoder=encoder, head=head, optimizer=optimizer)
    return run.finish()
