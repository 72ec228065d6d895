"""Small image data sets that live on the device, and batched augmentations for them.

Everything here is a tensor op on whole batches so that a tiny trainer spends its time in the model and the
loss, not in a Python data pipeline: the whole data set fits in memory (1797 digits are 460 KB).
``--data PATH`` reads an ImageFolder (PATH/<class>/<image>) once, resized, into the same in-memory form.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

DATASETS = ("digits", "synthetic")  # built in; anything else given to --data is an ImageFolder directory
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass
class Split:
    """Images (N×C×H×W float32 in [0, 1]; C=1 for digits/synthetic, 3 for a folder) and integer labels, already
    on the training device."""
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    fingerprint: str = ""  # of the images and labels as loaded (load()): a resumed run checks it is on the same data

    def describe(self) -> dict:
        return {"name": self.name, "train": int(self.train_x.shape[0]), "test": int(self.test_x.shape[0]),
                "classes": self.num_classes, "image_shape": list(self.train_x.shape[1:]),
                "fingerprint": self.fingerprint}


def fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """SHA-256 (16 hex digits) of the decoded images and their labels on the CPU: the same on every device, and
    different when a folder's images are added, removed, replaced or relabelled."""
    h = hashlib.sha256()
    for t in (images, labels):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


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


def _image_folder(root: str, image_size: int):
    """PATH/<class>/<image> -> (N×3×S×S float images in [0, 1], labels), classes in sorted order.

    torchvision's ImageFolder when it is installed, else the same walk with PIL. Every error names the files.
    """
    path = Path(root)
    if not path.is_dir():
        raise ValueError(f"--data {root!r}: not 'digits', 'synthetic' or an existing directory")
    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"--data {root}: no class folders found; expected an ImageFolder layout "
                         f"{root}/<class_name>/<image>{IMAGE_SUFFIXES[0]}")
    try:  # torchvision only lists the files here: we decode them ourselves to report every unreadable one
        from torchvision.datasets.folder import make_dataset
        samples = make_dataset(str(path), {c: i for i, c in enumerate(classes)}, extensions=IMAGE_SUFFIXES,
                               allow_empty=True)
    except (ImportError, TypeError):  # no torchvision, or one too old for allow_empty: the same walk by hand
        samples = [(str(f), i) for i, c in enumerate(classes) for f in sorted((path / c).rglob("*"))
                   if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]
    if not samples:
        raise ValueError(f"--data {root}: the class folders ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})"
                         f" hold no images with a suffix in {IMAGE_SUFFIXES}")
    from PIL import Image

    images, labels, bad = [], [], []
    for file, label in samples:
        try:
            with Image.open(file) as im:
                im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                buf = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        except Exception as e:  # PIL raises several types for a broken file; all mean "not an image"
            bad.append(f"{os.path.relpath(file, root)} ({type(e).__name__}: {e})")
            continue
        images.append(buf.view(image_size, image_size, 3).permute(2, 0, 1).float() / 255.0)
        labels.append(label)
    if bad:
        raise ValueError(f"--data {root}: {len(bad)} of {len(samples)} images could not be read, e.g. "
                         + "; ".join(bad[:3]) + ". Remove or fix them.")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def load(name: str, device, *, test_fraction: float = 0.25, subset: int | None = None, split_seed: int = 0,
         image_size: int = 32) -> Split:
    """Load ``name`` (``"digits"``, ``"synthetic"`` or an ImageFolder directory), hold out a stratified test split,
    move both to ``device``.

    ``subset`` keeps a random ``subset`` images before splitting (quick smoke runs). The split uses its own fixed
    seed, so runs with different ``--seed`` are evaluated on the same held-out images. ``image_size`` only
    applies to folders (the built-in sets are 8×8).
    """
    if name == "digits":
        images, labels = _digits()
    elif name == "synthetic":
        images, labels = _synthetic()
    else:
        images, labels = _image_folder(name, image_size)
    if subset is not None:
        if not (isinstance(subset, int) and 2 <= subset):
            raise ValueError(f"subset must be an int >= 2, got {subset!r}")
        keep = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(split_seed))[:subset]
        images, labels = images[keep], labels[keep]
    train_idx, test_idx = _stratified_split(labels, test_fraction, split_seed)
    if test_idx.numel() == 0 or train_idx.numel() == 0:
        raise ValueError(f"--data {name}: {images.shape[0]} images are too few to hold out {test_fraction:.0%} of "
                         "each class for evaluation and train on the rest (a class needs at least 3 images to "
                         "give one held-out image); add images")
    return Split(name, images[train_idx].to(device), labels[train_idx].to(device),
                 images[test_idx].to(device), labels[test_idx].to(device), int(labels.max()) + 1,
                 fingerprint(images, labels))


class Augment:
    """SimCLR-style views for small grey images, drawn independently per sample on the batch's device.

    One affine warp does random-resized-crop, shift and rotation together (a single grid_sample); then
    intensity jitter, Gaussian noise and random erasing. No flips: a mirrored 2 is not a 2.
    Uses the global torch RNG, so ``torch.manual_seed`` makes runs repeatable.

    Shift and erase sizes are fractions of the image side (1 and 2..4 pixels of an 8×8 digit).
    """

    def __init__(self, scale=(0.8, 1.15), max_shift: float = 0.125, max_rotation_deg: float = 15.0,
                 intensity=(0.6, 1.4), noise_std: float = 0.1, erase_p: float = 0.3, erase_size=(0.25, 0.5)):
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
        tx = self._uniform(n, -self.max_shift, self.max_shift, x) * 2.0  # [-1, 1] spans the image: 2 units
        ty = self._uniform(n, -self.max_shift, self.max_shift, x) * 2.0
        theta = torch.stack([torch.stack([s * a.cos(), -s * a.sin(), tx], 1),
                             torch.stack([s * a.sin(), s * a.cos(), ty], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # Zero padding matches the digits' black background.
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

        x = x * self._uniform(n, *self.intensity, x).view(n, 1, 1, 1)
        x = x + self.noise_std * torch.randn_like(x)

        # Random erasing: a rectangle of random size and place per sample, on a random subset of samples.
        lo, hi = (max(1, round(f * min(h, w))) for f in self.erase_size)
        eh = torch.randint(lo, hi + 1, (n, 1, 1), device=x.device)
        ew = torch.randint(lo, hi + 1, (n, 1, 1), device=x.device)
        y0 = (torch.rand(n, 1, 1, device=x.device) * (h - eh + 1)).floor()
        x0 = (torch.rand(n, 1, 1, device=x.device) * (w - ew + 1)).floor()
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        box = (rows >= y0) & (rows < y0 + eh) & (cols >= x0) & (cols < x0 + ew)
        box &= (torch.rand(n, 1, 1, device=x.device) < self.erase_p)
        return x.masked_fill(box.unsqueeze(1), 0.0)


class Shuffler:
    """Shuffled epochs of index batches from its own CPU generator, so a checkpoint can save where it is.

    The last incomplete batch is dropped (BatchNorm and the losses want full batches).
    """

    def __init__(self, n: int, batch_size: int, seed: int, device):
        self.n, self.batch_size, self.device = n, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self):
        perm = torch.randperm(self.n, generator=self.generator).to(self.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield perm[start:start + self.batch_size]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
