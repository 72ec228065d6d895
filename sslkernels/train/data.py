"""Small image data sets that live on the device, and batched augmentations for them.

Everything here is a tensor op on whole batches so that a tiny trainer spends its time in the model and the
loss, not in a Python data pipeline: the whole data set fits in memory (1797 digits are 460 KB).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DATASETS = ("digits", "synthetic")


@dataclass
class Split:
    """Images (N×1×H×W float32 in [0, 1]) and integer labels, already on the training device."""
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    def describe(self) -> dict:
        return {"name": self.name, "train": int(self.train_x.shape[0]), "test": int(self.test_x.shape[0]),
                "classes": self.num_classes, "image_shape": list(self.train_x.shape[1:])}


def _digits():
    # Imported here so that the package itself does not depend on scikit-learn.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32) / 16.0  # pixel values are 0..16
    return images.unsqueeze(1), torch.as_tensor(bunch.target, dtype=torch.long)


def _synthetic(n: int = 2000, classes: int = 10, seed: int = 0, noise: float = 0.3, max_shift: int = 1):
    """Digit-like stand-in with no dependency: a fixed blob shape per class on a black background, shifted
    (zero fill, like a digit moved in its box) and noised per sample."""
    g = torch.Generator().manual_seed(seed)
    # Upsampled 4×4 noise gives smooth 8×8 fields; keeping their bright half leaves stroke-like blobs.
    protos = F.interpolate(torch.rand(classes, 1, 4, 4, generator=g), size=(8, 8), mode="bilinear",
                           align_corners=False)
    lo, hi = protos.amin(dim=(2, 3), keepdim=True), protos.amax(dim=(2, 3), keepdim=True)
    protos = ((protos - lo) / (hi - lo) - 0.5).clamp_min(0) * 2
    labels = torch.arange(n) % classes
    padded = F.pad(protos[labels], (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=g).tolist()
    images = torch.stack([padded[i, :, r:r + 8, c:c + 8] for i, (r, c) in enumerate(offsets)])
    images = (images + noise * torch.randn(images.shape, generator=g)).clamp(0, 1)
    return images, labels


def _stratified_split(labels: torch.Tensor, test_fraction: float, seed: int):
    """Index tensors (train, test) holding out ``test_fraction`` of every class, the same for every run."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_test = int(round(idx.numel() * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def load(name: str, device, *, test_fraction: float = 0.25, subset: int | None = None, split_seed: int = 0) -> Split:
    """Load ``name`` (``"digits"`` or ``"synthetic"``), hold out a stratified test split, move both to ``device``.

    ``subset`` keeps a random ``subset`` images before splitting (quick smoke runs). The split uses its own fixed
    seed, so runs with different ``--seed`` are evaluated on the same held-out images.
    """
    if name == "digits":
        images, labels = _digits()
    elif name == "synthetic":
        images, labels = _synthetic()
    else:
        raise ValueError(f"data must be one of {DATASETS}, got {name!r}")
    if subset is not None:
        if not (isinstance(subset, int) and 2 <= subset):
            raise ValueError(f"subset must be an int >= 2, got {subset!r}")
        keep = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(split_seed))[:subset]
        images, labels = images[keep], labels[keep]
    train_idx, test_idx = _stratified_split(labels, test_fraction, split_seed)
    return Split(name, images[train_idx].to(device), labels[train_idx].to(device),
                 images[test_idx].to(device), labels[test_idx].to(device), int(labels.max()) + 1)


class Augment:
    """SimCLR-style views for small grey images, drawn independently per sample on the batch's device.

    One affine warp does random-resized-crop, shift and rotation together (a single grid_sample); then
    intensity jitter, Gaussian noise and random erasing. No flips: a mirrored 2 is not a 2.
    Uses the global torch RNG, so ``torch.manual_seed`` makes runs repeatable.
    """

    def __init__(self, scale=(0.8, 1.15), max_shift: float = 1.0, max_rotation_deg: float = 15.0,
                 intensity=(0.6, 1.4), noise_std: float = 0.1, erase_p: float = 0.3, erase_size=(2, 4)):
        self.scale = scale
        self.max_shift = max_shift
        self.max_rotation = math.radians(max_rotation_deg)
        self.intensity = intensity
        self.noise_std = noise_std
        self.erase_p = erase_p
        self.erase_size = erase_size

    @staticmethod
    def _uniform(n, low, high, like):
        return torch.empty(n, device=like.device, dtype=like.dtype).uniform_(low, high)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        # affine_grid maps output to input coordinates in [-1, 1]: a zoom factor s < 1 samples a smaller window
        # (a crop, magnified), s > 1 zooms out; one pixel is 2/W in these units.
        s = self._uniform(n, *self.scale, x)
        a = self._uniform(n, -self.max_rotation, self.max_rotation, x)
        tx = self._uniform(n, -self.max_shift, self.max_shift, x) * (2.0 / w)
        ty = self._uniform(n, -self.max_shift, self.max_shift, x) * (2.0 / h)
        theta = torch.stack([torch.stack([s * a.cos(), -s * a.sin(), tx], 1),
                             torch.stack([s * a.sin(), s * a.cos(), ty], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # Zero padding matches the digits' black background.
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

        x = x * self._uniform(n, *self.intensity, x).view(n, 1, 1, 1)
        x = x + self.noise_std * torch.randn_like(x)

        # Random erasing: a rectangle of random size and place per sample, on a random subset of samples.
        lo, hi = self.erase_size
        eh = torch.randint(lo, hi + 1, (n, 1, 1), device=x.device)
        ew = torch.randint(lo, hi + 1, (n, 1, 1), device=x.device)
        y0 = (torch.rand(n, 1, 1, device=x.device) * (h - eh + 1)).floor()
        x0 = (torch.rand(n, 1, 1, device=x.device) * (w - ew + 1)).floor()
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        box = (rows >= y0) & (rows < y0 + eh) & (cols >= x0) & (cols < x0 + ew)
        box &= (torch.rand(n, 1, 1, device=x.device) < self.erase_p)
        return x.masked_fill(box.unsqueeze(1), 0.0)
