"""Quick, Draw! bitmaps as tensors: load, stratified split, mini-batches.

One uint8 tensor holds every drawing (N, 28, 28); images become float only one batch at a time.
"""
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from utils.download import bitmap_path

SIDE = 28


@dataclass
class QuickDrawSet:
    """Drawings with their labels; class names travel with them (label i is classes[i])."""
    images: torch.Tensor  # (N, 28, 28) uint8
    labels: torch.Tensor  # (N,) int64
    classes: list[str]

    def __post_init__(self):
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "QuickDrawSet":
        """The drawings at index (int64 positions or a bool mask), copied."""
        if index.dtype == torch.bool:
            index = index.nonzero().squeeze(1)
        # index_select copies whole rows: many times faster than advanced indexing on uint8.
        return QuickDrawSet(self.images.index_select(0, index), self.labels.index_select(0, index), self.classes)

    def counts(self) -> torch.Tensor:
        """Drawings per class, (C,) int64."""
        return torch.bincount(self.labels, minlength=len(self.classes))


def _open_bitmap(root, name: str, max_per_class: int | None):
    """The first rows of one category's .npy as a read-only memory map, checked."""
    path = bitmap_path(root, name)
    if not path.is_file():
        hint = f" --max-per-class {max_per_class}" if max_per_class else ""
        raise FileNotFoundError(
            f"no bitmaps for category {name!r}: {path} is missing; "
            f"fetch it with: python -m utils.download \"{name}\" --root {root}{hint}")
    try:
        array = np.load(path, mmap_mode="r")
    except Exception as e:  # a truncated or foreign file: say which one
        raise ValueError(f"{path} is not a readable .npy file ({e})") from e
    if array.dtype != np.uint8 or array.ndim != 2 or array.shape[1] != SIDE * SIDE:
        raise ValueError(f"{path} holds {array.dtype} {array.shape}; expected uint8 (rows, {SIDE * SIDE})")
    return array[:max_per_class]


def load_bitmaps(categories: Iterable[str], root="data", max_per_class: int | None = None) -> QuickDrawSet:
    """Read <root>/numpy_bitmap/<name>.npy per category (first max_per_class rows) into one set."""
    classes = list(categories)
    if not classes:
        raise ValueError("no categories given")
    if len(set(classes)) != len(classes):
        raise ValueError(f"categories repeat: {classes}")
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be positive, got {max_per_class}")
    counts = [len(_open_bitmap(root, name, max_per_class)) for name in classes]
    images = torch.empty((sum(counts), SIDE, SIDE), dtype=torch.uint8)
    start = 0
    # Map one file at a time and let it go after copying, so at most one file's pages sit in memory
    # beside the tensor.
    for name, n in zip(classes, counts):
        images[start:start + n].view(n, SIDE * SIDE).numpy()[:] = _open_bitmap(root, name, max_per_class)
        start += n
    labels = torch.repeat_interleave(torch.arange(len(classes)), torch.tensor(counts))
    return QuickDrawSet(images, labels, classes)


def stratified_split(labels: torch.Tensor, fractions=(0.8, 0.1, 0.1), seed=0) -> tuple[torch.Tensor, ...]:
    """Index tensors, one per fraction, each holding that fraction of every class (rounded)."""
    fractions = torch.tensor(fractions, dtype=torch.float64)
    if fractions.ndim != 1 or len(fractions) == 0 or (fractions < 0).any() or abs(fractions.sum() - 1) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions.tolist()}")
    if labels.ndim != 1 or labels.dtype != torch.int64:
        raise ValueError(f"labels must be a 1-D int64 tensor, got {labels.dtype} {tuple(labels.shape)}")
    n = len(labels)
    g = torch.Generator().manual_seed(seed)
    # A random order, then a stable sort by class: each class contiguous and shuffled within.
    order = torch.randperm(n, generator=g)
    order = order[torch.argsort(labels[order], stable=True)]
    counts = torch.bincount(labels)  # (C,)
    cuts = torch.round(torch.cumsum(fractions, 0)[:, None] * counts).long()  # (P, C) cumulative
    cuts[-1] = counts
    sizes = torch.diff(cuts, dim=0, prepend=torch.zeros_like(cuts[:1]))  # (P, C)
    # In that order the parts are runs: class 0 part 0, class 0 part 1, ..., class 1 part 0, ...
    part = torch.empty(n, dtype=torch.int64)
    part[order] = torch.repeat_interleave(torch.arange(len(fractions)).repeat(len(counts)), sizes.T.flatten())
    return tuple(torch.nonzero(part == p).squeeze(1) for p in range(len(fractions)))


def split(ds: QuickDrawSet, fractions=(0.8, 0.1, 0.1), seed=0) -> tuple[QuickDrawSet, ...]:
    """Stratified train/val/test sets (by default 80/10/10), reproducible by seed."""
    return tuple(ds.subset(index) for index in stratified_split(ds.labels, fractions, seed))


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B,28,28) or (B,1,28,28) -> float32 (B,1,28,28) in [0, 1]: the models' input."""
    if images.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 images, got {images.dtype}")
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected images (B,28,28) or (B,1,28,28), got {tuple(images.shape)}")
    return images.float().div_(255)


def iterate_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle=True,
                    generator: torch.Generator | None = None, device="cpu",
                    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    drop_last=False, index: torch.Tensor | None = None
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (x float32 (B,1,28,28), y int64 (B,)) by slicing a shuffled index tensor.

    index (int64 positions, e.g. from stratified_split) limits the epoch to those drawings without
    copying them out, so a split of a large set costs no second copy of its images.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rows = torch.arange(len(labels)) if index is None else index
    n = len(rows)
    order = rows[torch.randperm(n, generator=generator)] if shuffle else rows
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        batch = order[start:start + batch_size]
        # Gather and move uint8 (4x fewer bytes than float), convert on the device.
        x = to_float(images.index_select(0, batch).to(device, non_blocking=True))
        y = labels.index_select(0, batch).to(device, non_blocking=True)
        yield (transform(x) if transform is not None else x), y
