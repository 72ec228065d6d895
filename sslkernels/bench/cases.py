"""Benchmark cases: one definition per op, shared by the CLI, the memory worker and benchmarks/.

An :class:`OpSpec` says how to build an op's inputs for a size (random data, never zeros: zeros hide
NaN paths and make some kernels take shortcuts), which size presets exist, and how much work a call
does (FLOPs and compulsory bytes, for TFLOP/s, GB/s and the roofline fraction).

Every implementation is called with the *registered* signature (sslkernels/backends.py): the inputs
are built once per case and validated by construction, so the timings compare kernels, not argument
checks. ``Inputs.args`` are those positional arguments; peers read what they need from ``extra``.

Work formulas (s = bytes per input element; "fwd" / "bwd" / "fwd+bwd" = fwd + bwd):
FLOPs count the useful arithmetic of the math (matmuls 2·m·n·k, elementwise ops a few per element), not
what an implementation does on top (a fused kernel that recomputes the logits in its backward does more
work than counted, so its TFLOP/s is "model FLOP/s", as in MFU). Bytes are the compulsory traffic: each
input read once and each output / gradient written once per pass; materialized intermediates (the N×M
logits of the eager reference) are deliberately *not* counted, since avoiding them is the point.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import models

Work = Dict[str, Tuple[float, float]]  # mode -> (flops, bytes)

PRESETS = ("quick", "small", "paper")


@dataclass(frozen=True)
class Size:
    label: str
    dims: Dict[str, int]
    source: str = ""

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.dims.items())


@dataclass
class Inputs:
    args: tuple                                   # positional arguments of the registered implementations
    leaves: List[torch.Tensor]                    # tensors that receive gradients (cleared before each backward)
    extra: Dict[str, Any] = field(default_factory=dict)  # what peers need (hyper-parameters, labels, ...)


@dataclass(frozen=True)
class OpSpec:
    name: str                                     # API name (shared/API.md)
    registry: str                                 # name in sslkernels.backends' registry
    build: Callable[[Size, torch.dtype, torch.device, torch.Generator], Inputs]
    grad: bool                                    # differentiable: time fwd, bwd and fwd+bwd
    sizes: Dict[str, Tuple[Size, ...]]            # preset -> sizes
    fwd_work: Callable[[Dict[str, int], int], Tuple[float, float]]
    bwd_work: Optional[Callable[[Dict[str, int], int], Tuple[float, float]]]
    formula: str                                  # the work formulas in words (goes into results.json)
    ties: Dict[str, Tuple[str, ...]] = field(default_factory=dict)  # sweep: dims that follow a swept dim
    inplace: bool = False                         # updates its inputs (outputs cannot be compared across impls)

    @property
    def modes(self) -> Tuple[str, ...]:
        return ("fwd", "bwd", "fwd+bwd") if self.grad else ("fwd",)

    @property
    def primary_mode(self) -> str:
        """The mode a training step pays for: fwd+bwd for losses, the call itself for the rest."""
        return "fwd+bwd" if self.grad else "fwd"

    def work(self, dims: Dict[str, int], esize: int) -> Work:
        fwd = self.fwd_work(dims, esize)
        out = {"fwd": fwd}
        if self.bwd_work is not None:
            bwd = self.bwd_work(dims, esize)
            out["bwd"] = bwd
            out["fwd+bwd"] = (fwd[0] + bwd[0], fwd[1] + bwd[1])
        return out


# ----------------------------------------------------------------------------------------- inputs


def _randn(g: torch.Generator, shape, device, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).mul_(scale).to(dtype)


def _features(g, n: int, d: int, dtype, device, *, normalize: bool = True, grad: bool = True) -> torch.Tensor:
    """Random rows, L2-normalized where the method passes normalized features (SimCLR, MoCo, CLIP)."""
    x = torch.randn(n, d, generator=g, device=device, dtype=torch.float32)
    if normalize:
        x = F.normalize(x, dim=1)
    return x.to(dtype).requires_grad_(grad)


def _build_info_nce(size, dtype, device, g):
    d = size.dims
    q, k = _features(g, d["N"], d["D"], dtype, device), _features(g, d["M"], d["D"], dtype, device)
    tau = 0.1
    return Inputs((q, k, tau, None, False, False, "mean"), [q, k], {"temperature": tau})


def _build_nt_xent(size, dtype, device, g):
    d = size.dims
    z1, z2 = _features(g, d["N"], d["D"], dtype, device), _features(g, d["N"], d["D"], dtype, device)
    tau = 0.5
    return Inputs((z1, z2, tau, False, "mean"), [z1, z2], {"temperature": tau})


def _build_clip(size, dtype, device, g):
    d = size.dims
    i, t = _features(g, d["N"], d["D"], dtype, device), _features(g, d["N"], d["D"], dtype, device)
    scale = 1 / 0.07  # CLIP's initial exp(logit_scale)
    return Inputs((i, t, scale, "mean"), [i, t], {"logit_scale": scale})


def _build_siglip(size, dtype, device, g):
    d = size.dims
    i, t = _features(g, d["N"], d["D"], dtype, device), _features(g, d["N"], d["D"], dtype, device)
    scale, bias = 10.0, -10.0  # SigLIP's initialisation: t' = log 10, b = -10
    return Inputs((i, t, scale, bias, "mean"), [i, t], {"logit_scale": scale, "logit_bias": bias})


def _build_moco(size, dtype, device, g):
    d = size.dims
    q = _features(g, d["N"], d["D"], dtype, device)
    k = _features(g, d["N"], d["D"], dtype, device, grad=False)  # the momentum encoder's keys: no gradient
    queue = _features(g, d["K"], d["D"], dtype, device, grad=False)
    tau = 0.2
    return Inputs((q, k, queue, tau, "mean"), [q], {"temperature": tau})


def _build_supcon(size, dtype, device, g):
    d = size.dims
    n = d["N"]
    f = _features(g, n, d["D"], dtype, device)
    # Two views per image, stacked view-major (as SupCon and lightly do): every anchor has a positive.
    half = torch.randint(0, d["C"], (n - n // 2,), generator=g, device=device)
    labels = torch.cat([half, half])[:n]
    tau = 0.1
    return Inputs((f, labels, tau, "mean"), [f], {"temperature": tau, "labels": labels})


def _build_negcos(size, dtype, device, g):
    d = size.dims
    p = _features(g, d["N"], d["D"], dtype, device, normalize=False)
    z = _features(g, d["N"], d["D"], dtype, device, normalize=False, grad=False)
    return Inputs((p, z, "mean"), [p])


def _build_dino(size, dtype, device, g):
    d = size.dims
    b, s, t, p = d["B"], d["S"], d["T"], d["P"]
    student = _features(g, s * b, p, dtype, device, normalize=False)
    teacher = _features(g, t * b, p, dtype, device, normalize=False, grad=False)
    center = _randn(g, (1, p), device, scale=0.1)  # DINO keeps its centre in fp32
    return Inputs((student, teacher, center, 0.1, 0.04, t, "mean"), [student],
                  {"student_temp": 0.1, "teacher_temp": 0.04, "n_global_crops": t, "n_crops": s})


def _build_center(size, dtype, device, g):
    d = size.dims
    teacher = _features(g, d["T"] * d["B"], d["P"], dtype, device, normalize=False, grad=False)
    center = _randn(g, (1, d["P"]), device, scale=0.1)
    return Inputs((center, teacher, 0.9), [], {"momentum": 0.9})


def _build_sinkhorn(size, dtype, device, g):
    d = size.dims
    # Prototype scores are cosine similarities: uniform in [-1, 1].
    scores = (torch.rand(d["B"], d["P"], generator=g, device=device) * 2 - 1).to(dtype)
    return Inputs((scores, 0.05, 3), [], {"epsilon": 0.05, "iterations": 3})


def _build_cross_correlation(defaults):
    def build(size, dtype, device, g):
        d = size.dims
        z1 = _features(g, d["N"], d["D"], dtype, device, normalize=False)
        z2 = _features(g, d["N"], d["D"], dtype, device, normalize=False)
        return Inputs((z1, z2, *defaults), [z1, z2])
    return build


def _ema_shapes(size: Size):
    if size.label in models.MODELS:
        return models.MODELS[size.label]()
    # A custom or swept parameter count: the ResNet-50 tensor list at the width that gives about P.
    width = (size.dims["P"] / models.numel(models.resnet50())) ** 0.5
    return models.resnet50(width=width)


def _build_ema(size, dtype, device, g):
    shapes = _ema_shapes(size)
    targets = [_randn(g, s, device, dtype, 0.02) for s in shapes]
    sources = [(t.float() + _randn(g, s, device, scale=1e-3)).to(dtype) for t, s in zip(targets, shapes)]
    m = 0.996  # BYOL / DINO base momentum
    return Inputs((targets, sources, m), [], {"momentum": m, "shapes": shapes})


def _build_enqueue(size, dtype, device, g):
    d = size.dims
    queue = _features(g, d["K"], d["D"], dtype, device, grad=False)
    keys = _features(g, d["B"], d["D"], dtype, device, grad=False)
    ptr = torch.zeros((), dtype=torch.long, device=device)
    return Inputs((queue, ptr, keys, False), [])


def _build_similarity(size, dtype, device, g):
    d = size.dims
    a = _features(g, d["N"], d["D"], dtype, device, normalize=False)
    b = _features(g, d["M"], d["D"], dtype, device, normalize=False)
    return Inputs((a, b, True), [a, b])


def _build_knn(size, dtype, device, g):
    d = size.dims
    q = _features(g, d["N"], d["D"], dtype, device, normalize=False, grad=False)
    bank = _features(g, d["M"], d["D"], dtype, device, grad=False)
    return Inputs((q, bank, d["k"], True), [])


def _build_rankme(size, dtype, device, g):
    d = size.dims
    return Inputs((_features(g, d["N"], d["D"], dtype, device, normalize=False, grad=False), 1e-7), [])


# ------------------------------------------------------------------------------------------- work


def _pairwise(rows_a: str, rows_b: str, grads: int = 2):
    """Work of a loss over the |a|×|b| logits of a @ b.T: fwd 2·A·B·D; bwd 2·A·B·D per input with a gradient."""
    def fwd(d, s):
        a, b = d[rows_a], d[rows_b]
        return 2.0 * a * b * d["D"], (a + b) * d["D"] * s

    def bwd(d, s):
        a, b = d[rows_a], d[rows_b]
        return 2.0 * grads * a * b * d["D"], (a + b) * d["D"] * s + (a + b if grads == 2 else a) * d["D"] * s
    return fwd, bwd


def _work_nt_xent():
    # Z = [z1; z2] is 2N×D and the logits Z·Zᵀ are 2N×2N.
    def fwd(d, s):
        return 2.0 * (2 * d["N"]) ** 2 * d["D"], 2 * d["N"] * d["D"] * s

    def bwd(d, s):
        return 4.0 * (2 * d["N"]) ** 2 * d["D"], 4 * d["N"] * d["D"] * s
    return fwd, bwd


def _work_moco():
    def fwd(d, s):
        n, k, dd = d["N"], d["K"], d["D"]
        return 2.0 * n * (k + 1) * dd, (2 * n + k) * dd * s

    def bwd(d, s):  # only the query gets a gradient
        n, k, dd = d["N"], d["K"], d["D"]
        return 2.0 * n * (k + 1) * dd, (3 * n + k) * dd * s
    return fwd, bwd


def _work_supcon():
    def fwd(d, s):
        return 2.0 * d["N"] ** 2 * d["D"], d["N"] * d["D"] * s + 8 * d["N"]

    def bwd(d, s):  # F·Fᵀ has F on both sides: two N×N×D products
        return 4.0 * d["N"] ** 2 * d["D"], 2 * d["N"] * d["D"] * s + 8 * d["N"]
    return fwd, bwd


def _work_negcos():
    def fwd(d, s):  # p·z, |p|², |z|²
        return 6.0 * d["N"] * d["D"], 2 * d["N"] * d["D"] * s

    def bwd(d, s):
        return 4.0 * d["N"] * d["D"], 3 * d["N"] * d["D"] * s
    return fwd, bwd


def _work_dino():
    def fwd(d, s):
        b, sc, t, p = d["B"], d["S"], d["T"], d["P"]
        pairs = t * (sc - 1)  # teacher crop a with every student crop b != a
        flops = 4.0 * (sc + t) * b * p + 2.0 * pairs * b * p  # softmaxes ~4/element, each pair a dot of length P
        return flops, (sc + t) * b * p * s + 4 * p

    def bwd(d, s):
        b, sc, t, p = d["B"], d["S"], d["T"], d["P"]
        return (t + 3.0) * sc * b * p, (sc + t) * b * p * s + sc * b * p * s
    return fwd, bwd


def _work_center(d, s):
    return d["T"] * d["B"] * d["P"] + 3.0 * d["P"], d["T"] * d["B"] * d["P"] * s + 8 * d["P"]


def _work_sinkhorn(d, s):
    it = 3  # the benchmark's iterations
    # exp pass + per iteration a row sum/scale and a column sum/scale; read scores, write fp32 Q.
    return (3.0 + 4.0 * it) * d["B"] * d["P"], d["B"] * d["P"] * (s + 4)


def _work_cross_correlation(n_products: int):
    def fwd(d, s):  # Barlow Twins: C = aᵀb (one D×D product); VICReg: two covariances
        return 2.0 * n_products * d["N"] * d["D"] ** 2 + 10.0 * d["N"] * d["D"], 2 * d["N"] * d["D"] * s

    def bwd(d, s):
        return 4.0 * n_products * d["N"] * d["D"] ** 2 + 10.0 * d["N"] * d["D"], 4 * d["N"] * d["D"] * s
    return fwd, bwd


def _work_ema(d, s):  # t + w·(s − t): 3 FLOPs; read t and s, write t
    return 3.0 * d["P"], 3 * d["P"] * s


def _work_enqueue(d, s):  # read the keys, write them into the ring
    return 0.0, 2 * d["B"] * d["D"] * s


def _work_similarity():
    def fwd(d, s):
        n, m, dd = d["N"], d["M"], d["D"]
        return 2.0 * n * m * dd + 3.0 * (n + m) * dd, (n + m) * dd * s + n * m * s

    def bwd(d, s):
        n, m, dd = d["N"], d["M"], d["D"]
        return 4.0 * n * m * dd + 6.0 * (n + m) * dd, n * m * s + 2 * (n + m) * dd * s
    return fwd, bwd


def _work_knn(d, s):
    n, m, dd, k = d["N"], d["M"], d["D"], d["k"]
    return 2.0 * n * m * dd, (n + m) * dd * s + n * k * 12


def _work_rankme(d, s):
    n, dd = d["N"], d["D"]
    a, b = max(n, dd), min(n, dd)
    return 4.0 * a * b * b - 4.0 / 3.0 * b ** 3, n * dd * s  # Householder bidiagonalization dominates svdvals


# ------------------------------------------------------------------------------------------ sizes


def _S(label: str, source: str = "", **dims) -> Size:
    return Size(label, dict(dims), source)


def _sizes(quick, small, paper) -> Dict[str, Tuple[Size, ...]]:
    return {"quick": tuple(quick), "small": tuple(small), "paper": tuple(paper)}


_CLIP = "CLIP (Radford et al. 2021): batch 32768"


def _specs() -> Dict[str, OpSpec]:
    pw = _pairwise("N", "M")
    sq = _pairwise("N", "N")
    specs = [
        OpSpec("info_nce", "info_nce", _build_info_nce, True, _sizes(
            [_S("quick", N=256, M=256, D=64)],
            [_S("small", N=2048, M=2048, D=128)],
            [_S("mocov3", "MoCo v3 (Chen et al. 2021): batch 4096, 256-d", N=4096, M=4096, D=256),
             _S("clip-b-1dir", _CLIP + ", one direction, 512-d", N=32768, M=32768, D=512)]),
            pw[0], pw[1], "fwd 2·N·M·D FLOPs, (N+M)·D·s bytes; bwd 4·N·M·D FLOPs (dQ and dK), 2·(N+M)·D·s bytes",
            {"N": ("M",)}),
        OpSpec("nt_xent", "nt_xent", _build_nt_xent, True, _sizes(
            [_S("quick", N=128, D=64)],
            [_S("small", N=1024, D=128)],
            [_S("simclr", "SimCLR (Chen et al. 2020): batch 4096, 128-d projections", N=4096, D=128)]),
            *_work_nt_xent(), "Z is 2N×D: fwd 2·(2N)²·D FLOPs, 2·N·D·s bytes; bwd 4·(2N)²·D FLOPs, 4·N·D·s bytes"),
        OpSpec("clip_loss", "clip_loss", _build_clip, True, _sizes(
            [_S("quick", N=256, D=64)],
            [_S("small", N=4096, D=512)],
            [_S("clip-b", _CLIP + ", ViT-B 512-d", N=32768, D=512),
             _S("clip-l", _CLIP + ", ViT-L 768-d", N=32768, D=768),
             _S("clip-h", _CLIP + ", ViT-H 1024-d", N=32768, D=1024)]),
            sq[0], sq[1], "fwd 2·N²·D FLOPs, 2·N·D·s bytes; bwd 4·N²·D FLOPs, 4·N·D·s bytes"),
        OpSpec("siglip_loss", "siglip_loss", _build_siglip, True, _sizes(
            [_S("quick", N=256, D=64)],
            [_S("small", N=4096, D=512)],
            [_S("siglip-b", "SigLIP (Zhai et al. 2023): batch 32768, 768-d", N=32768, D=768)]),
            sq[0], sq[1], "fwd 2·N²·D FLOPs, 2·N·D·s bytes; bwd 4·N²·D FLOPs, 4·N·D·s bytes"),
        OpSpec("moco_loss", "moco_loss", _build_moco, True, _sizes(
            [_S("quick", N=64, K=1024, D=64)],
            [_S("small", N=256, K=16384, D=128)],
            [_S("mocov2", "MoCo v2 (Chen et al. 2020): batch 256, queue 65536, 128-d", N=256, K=65536, D=128)]),
            *_work_moco(), "fwd 2·N·(K+1)·D FLOPs, (2N+K)·D·s bytes; bwd (query only) 2·N·(K+1)·D FLOPs, "
            "(3N+K)·D·s bytes"),
        OpSpec("supcon_loss", "supcon_loss", _build_supcon, True, _sizes(
            [_S("quick", N=256, D=64, C=16)],
            [_S("small", N=2048, D=128, C=100)],
            [_S("supcon", "SupCon (Khosla et al. 2020): 2048 images × 2 views, 128-d, 1000 classes",
                N=4096, D=128, C=1000)]),
            *_work_supcon(), "fwd 2·N²·D FLOPs, N·D·s + 8N bytes; bwd 4·N²·D FLOPs, 2·N·D·s + 8N bytes"),
        OpSpec("negative_cosine_similarity", "negative_cosine_similarity", _build_negcos, True, _sizes(
            [_S("quick", N=256, D=128)],
            [_S("small", N=4096, D=256)],
            [_S("byol", "BYOL (Grill et al. 2020): batch 4096, 256-d predictions", N=4096, D=256),
             _S("simsiam", "SimSiam (Chen & He 2021): batch 512, 2048-d", N=512, D=2048)]),
            *_work_negcos(), "fwd 6·N·D FLOPs, 2·N·D·s bytes; bwd 4·N·D FLOPs, 3·N·D·s bytes"),
        OpSpec("dino_loss", "dino_loss", _build_dino, True, _sizes(
            [_S("quick", B=8, S=4, T=2, P=1024)],
            [_S("small", B=16, S=12, T=2, P=16384)],
            [_S("dino", "DINO (Caron et al. 2021): 64 images/GPU, 2 global + 10 local crops, 65536 prototypes",
                B=64, S=12, T=2, P=65536)]),
            *_work_dino(), "S student crops, T teacher crops: fwd 4·(S+T)·B·P + 2·T·(S−1)·B·P FLOPs, "
            "(S+T)·B·P·s + 4P bytes; bwd (T+3)·S·B·P FLOPs, (2S+T)·B·P·s bytes"),
        OpSpec("update_center_", "update_center_", _build_center, False, _sizes(
            [_S("quick", B=8, T=2, P=1024)],
            [_S("small", B=16, T=2, P=16384)],
            [_S("dino", "DINO: 2 global crops × 64 images, 65536 prototypes", B=64, T=2, P=65536)]),
            _work_center, None, "T·B·P + 3P FLOPs, T·B·P·s + 8P bytes", inplace=True),
        OpSpec("sinkhorn_knopp", "sinkhorn_knopp", _build_sinkhorn, False, _sizes(
            [_S("quick", B=64, P=512)],
            [_S("small", B=1024, P=3000)],
            [_S("swav", "SwAV (Caron et al. 2020): batch 4096, 3000 prototypes", B=4096, P=3000),
             _S("dinov2", "DINOv2 (Oquab et al. 2023): Sinkhorn-Knopp centring, 65536 prototypes", B=256, P=65536)]),
            _work_sinkhorn, None, "3 iterations: 15·B·P FLOPs, B·P·(s+4) bytes (read scores, write fp32 Q)"),
        OpSpec("barlow_twins_loss", "barlow_twins_loss", _build_cross_correlation((5e-3,)), True, _sizes(
            [_S("quick", N=128, D=256)],
            [_S("small", N=512, D=2048)],
            [_S("barlow", "Barlow Twins (Zbontar et al. 2021): batch 2048, 8192-d", N=2048, D=8192)]),
            *_work_cross_correlation(1), "fwd 2·N·D² + 10·N·D FLOPs, 2·N·D·s bytes; bwd 4·N·D² + 10·N·D FLOPs, "
            "4·N·D·s bytes"),
        OpSpec("vicreg_loss", "vicreg_loss", _build_cross_correlation((25.0, 25.0, 1.0)), True, _sizes(
            [_S("quick", N=128, D=256)],
            [_S("small", N=512, D=2048)],
            [_S("vicreg", "VICReg (Bardes et al. 2022): batch 2048, 8192-d", N=2048, D=8192)]),
            *_work_cross_correlation(2), "two covariances: fwd 4·N·D² + 10·N·D FLOPs, 2·N·D·s bytes; "
            "bwd 8·N·D² + 10·N·D FLOPs, 4·N·D·s bytes"),
        OpSpec("ema_update_", "ema_update_", _build_ema, False, _sizes(
            [_ema_size("resnet50-w8")],
            [_ema_size("resnet50")],
            [_ema_size("resnet50"), _ema_size("vit-b"), _ema_size("vit-l")]),
            _work_ema, None, "P parameters: 3·P FLOPs, 3·P·s bytes (read target and source, write target)",
            inplace=True),
        OpSpec("MemoryQueue.enqueue_", "queue_enqueue_", _build_enqueue, False, _sizes(
            [_S("quick", K=1024, D=64, B=64)],
            [_S("small", K=16384, D=128, B=256)],
            [_S("mocov2", "MoCo v2: queue 65536 × 128, batch 256", K=65536, D=128, B=256)]),
            _work_enqueue, None, "0 FLOPs, 2·B·D·s bytes (read the keys, write them into the ring)", inplace=True),
        OpSpec("similarity", "similarity", _build_similarity, True, _sizes(
            [_S("quick", N=256, M=512, D=64)],
            [_S("small", N=1024, M=8192, D=256)],
            [_S("knn-eval", "DINO-style kNN evaluation: 1024 queries × a 65536-row bank chunk, 768-d",
                N=1024, M=65536, D=768)]),
            *_work_similarity(), "fwd 2·N·M·D + 3·(N+M)·D FLOPs, (N+M)·D·s + N·M·s bytes (the output is N×M); "
            "bwd 4·N·M·D FLOPs, N·M·s + 2·(N+M)·D·s bytes", {"N": ("M",)}),
        OpSpec("knn_topk", "knn_topk", _build_knn, False, _sizes(
            [_S("quick", N=64, M=2048, D=64, k=20)],
            [_S("small", N=256, M=65536, D=256, k=20)],
            [_S("imagenet-knn", "DINO kNN eval (Caron et al. 2021): ImageNet train bank 1281167 × 768, k=20",
                N=1024, M=1281167, D=768, k=20)]),
            _work_knn, None, "2·N·M·D FLOPs, (N+M)·D·s + 12·N·k bytes (values and int64 indices)"),
        OpSpec("rankme", "rankme", _build_rankme, False, _sizes(
            [_S("quick", N=512, D=64)],
            [_S("small", N=4096, D=512)],
            [_S("rankme", "RankMe (Garrido et al. 2023): 25600 ResNet-50 embeddings, 2048-d", N=25600, D=2048)]),
            _work_rankme, None, "svdvals of N×D (N≥D): 4·N·D² − 4/3·D³ FLOPs, N·D·s bytes"),
    ]
    return {s.name: s for s in specs}


def _ema_size(model: str) -> Size:
    shapes = models.MODELS[model]()
    return Size(model, {"P": models.numel(shapes), "tensors": len(shapes)},
                f"{model}: {len(shapes)} parameter tensors, {models.numel(shapes) / 1e6:.1f}M parameters")


SPECS: Dict[str, OpSpec] = _specs()

# Names users may type for ops whose API name is not an identifier.
ALIASES = {"enqueue_": "MemoryQueue.enqueue_", "queue_enqueue_": "MemoryQueue.enqueue_",
           "memory_queue": "MemoryQueue.enqueue_", "ema": "ema_update_"}


def resolve_op(name: str) -> OpSpec:
    key = ALIASES.get(name, name)
    if key not in SPECS:
        raise ValueError(f"unknown op {name!r}; choose from {sorted(SPECS)}")
    return SPECS[key]


def default_preset(device: torch.device) -> str:
    return "paper" if device.type == "cuda" else "small"


def sweep_sizes(spec: OpSpec, base: Size, dim: str, start: int, stop: int) -> List[Size]:
    """``dim`` from ``start`` doubling to ``stop``; dims tied to it (M = N for info_nce) follow."""
    if dim not in base.dims:
        return []
    out = []
    v = start
    while v <= stop:
        dims = dict(base.dims)
        dims[dim] = v
        for tied in spec.ties.get(dim, ()):
            if base.dims.get(tied) == base.dims[dim]:
                dims[tied] = v
        out.append(Size(f"{dim}={v}", dims, f"sweep of {dim} over {base.label}"))
        v *= 2
    return out


def override_size(base: Size, overrides: Dict[str, int]) -> Optional[Size]:
    """``base`` with the dims in ``overrides`` it has; None if it has none of them."""
    if not any(k in base.dims for k in overrides):
        return None
    dims = {k: overrides.get(k, v) for k, v in base.dims.items()}
    return Size("custom", dims, "command line")


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def case_seed(op: str, size: Size, dtype: torch.dtype) -> int:
    """A fixed seed per case, so the memory worker rebuilds exactly the inputs the timing run used."""
    return zlib.crc32(f"{op}|{size.describe()}|{dtype}".encode())
