"""Parameter shapes of real networks, for benchmarking EMA updates without timm or torchvision.

The EMA kernels care about the number of tensors and their sizes (launch count, tail handling,
alignment), so the lists reproduce the architectures' exact shapes and order.
"""
from __future__ import annotations

from typing import List, Tuple

Shape = Tuple[int, ...]


def resnet50(width: float = 1.0, num_classes: int = 1000) -> List[Shape]:
    """torchvision's ResNet-50: 161 parameter tensors, 25.56M parameters at width 1.

    ``width`` scales every channel count (for small CPU runs); the tensor count stays 161.
    """
    def c(n: int) -> int:
        return max(1, int(round(n * width)))

    shapes: List[Shape] = []

    def conv_bn(cin: int, cout: int, k: int) -> None:
        shapes.extend([(cout, cin, k, k), (cout,), (cout,)])  # conv weight (no bias), BN weight, BN bias

    conv_bn(3, c(64), 7)
    cin = c(64)
    for blocks, w in ((3, 64), (4, 128), (6, 256), (3, 512)):
        for b in range(blocks):
            conv_bn(cin, c(w), 1)
            conv_bn(c(w), c(w), 3)
            conv_bn(c(w), c(4 * w), 1)
            if b == 0:
                conv_bn(cin, c(4 * w), 1)  # the projection shortcut of each stage's first block
            cin = c(4 * w)
    shapes.extend([(num_classes, cin), (num_classes,)])
    return shapes


def vit(dim: int, depth: int, *, mlp_ratio: int = 4, patch: int = 16, image: int = 224,
        num_classes: int = 1000) -> List[Shape]:
    """timm's vit_*_patch16_224 parameter list (ViT-B: dim 768, depth 12, 86.6M; ViT-L: 1024, 24, 304.3M)."""
    tokens = (image // patch) ** 2 + 1
    hidden = mlp_ratio * dim
    shapes: List[Shape] = [(dim, 3, patch, patch), (dim,), (1, 1, dim), (1, tokens, dim)]
    for _ in range(depth):
        shapes.extend([
            (dim,), (dim,),                     # norm1
            (3 * dim, dim), (3 * dim,),         # attn.qkv
            (dim, dim), (dim,),                 # attn.proj
            (dim,), (dim,),                     # norm2
            (hidden, dim), (hidden,),           # mlp.fc1
            (dim, hidden), (dim,),              # mlp.fc2
        ])
    shapes.extend([(dim,), (dim,), (num_classes, dim), (num_classes,)])
    return shapes


MODELS = {
    "resnet50": lambda: resnet50(),
    "vit-b": lambda: vit(768, 12),
    "vit-l": lambda: vit(1024, 24),
    # Quick runs: the ResNet-50 tensor list at 1/8 width (still 161 tensors, ~0.6M parameters).
    "resnet50-w8": lambda: resnet50(width=1 / 8),
}


def numel(shapes: List[Shape]) -> int:
    total = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        total += n
    return total
