"""Quick, Draw! bitmaps as tensors: load, stratified split, mini-batches.

One uint8 tensor holds every drawing (N, 28, 28); images become float only one batch at a time.
"""
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from utils.download import bitmap_path
from utils.formats import SIDE
from utils.npy import read_file_header


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


def _bitmap_file(root, name: str, max_per_class: int | None) -> tuple[Path, int, int, bool]:
    """One category's .npy checked from its header: (path, rows it holds, byte offset of row 0, Fortran order)."""
    path = bitmap_path(root, name)
    if not path.is_file():
        hint = f" --max-per-class {max_per_class}" if max_per_class else ""
        raise FileNotFoundError(
            f"no bitmaps for category {name!r}: {path} is missing; "
            f"fetch it with: python -m utils.download \"{name}\" --root {root}{hint}")
    header = read_file_header(path, SIDE * SIDE)  # a ValueError naming a foreign or damaged file
    size, rows = path.stat().st_size, header.rows
    if size - header.size < rows * SIDE * SIDE:
        raise ValueError(f"{path} is truncated: {size - header.size:,} bytes of pixels for {rows:,} rows of "
                         f"{SIDE * SIDE}")
    return path, rows, header.size, header.fortran_order


def _read_rows(path: Path, offset: int, fortran_order: bool, out: np.ndarray) -> None:
    """The first len(out) rows of a checked .npy into out (rows, 784) uint8, a view of the set's tensor."""
    if fortran_order:  # its rows are not contiguous on disk: let numpy gather them through a map
        out[:] = np.load(path, mmap_mode="r")[:len(out)]
        return
    # One read straight into the tensor: no map of the file in this process, no second copy.
    view = memoryview(out).cast("B")
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(view):  # a read may return less than asked (signals, reads over 2 GB)
            got = f.readinto(view[done:])
            if not got:
                raise ValueError(f"{path} ended {len(view) - done:,} bytes early")
            done += got


def available_memory() -> int | None:
    """Bytes of RAM that can be allocated now without swapping (MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # no /proc: free pages only, which leaves out the reclaimable page cache
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def load_bitmaps(categories: Iterable[str], root="data", max_per_class: int | None = None) -> QuickDrawSet:
    """Read <root>/numpy_bitmap/<name>.npy per category (first max_per_class rows) into one set.

    Raises MemoryError, before allocating, when the set would not fit in the memory available.
    """
    classes = list(categories)
    if not classes:
        raise ValueError("no categories given")
    if len(set(classes)) != len(classes):
        raise ValueError(f"categories repeat: {classes}")
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be positive, got {max_per_class}")
    files = [_bitmap_file(root, name, max_per_class) for name in classes]
    held = [rows for _, rows, _, _ in files]
    counts = held if max_per_class is None else [min(rows, max_per_class) for rows in held]
    short = [f"{name!r} has {rows:,}" for name, rows in zip(classes, held) if rows < (max_per_class or 0)]
    if short:
        warnings.warn(f"max_per_class={max_per_class:,} but {', '.join(short)} drawings; loading those",
                      stacklevel=2)
    # Past the memory available the kernel kills the process without a word: refuse first, saying why.
    row_bytes = SIDE * SIDE + 8  # pixels + an int64 label
    need, available = sum(counts) * row_bytes, available_memory()
    if available is not None and need > available:
        fits = available // (row_bytes * len(classes))
        raise MemoryError(
            f"{sum(counts):,} drawings of {len(classes)} categories need {need / 2**30:.1f} GiB but "
            f"{available / 2**30:.1f} GiB of memory is available; load fewer with max_per_class "
            f"(at most {fits:,} per category fits) or fewer categories")
    images = torch.empty((sum(counts), SIDE, SIDE), dtype=torch.uint8)
    rows = images.view(-1, SIDE * SIDE).numpy()  # (N, 784), shares the tensor's memory
    starts = [0, *accumulate(counts)]
    jobs = [(path, offset, fortran_order, rows[start:start + n])
            for (path, _, offset, fortran_order), start, n in zip(files, starts, counts)]
    # Most of a read is the kernel filling fresh pages, outside the GIL: files in parallel, one per core.
    with ThreadPoolExecutor(min(len(jobs), os.cpu_count() or 1)) as pool:
        list(pool.map(lambda job: _read_rows(*job), jobs))
    labels = torch.repeat_interleave(torch.arange(len(classes)), torch.tensor(counts))
    return QuickDrawSet(images, labels, classes)


def stratified_split(labels: torch.Tensor, fractions=(0.8, 0.1, 0.1), seed=0) -> tuple[torch.Tensor, ...]:
    """Index tensors (ascending), one per fraction, each holding that fraction of every class (rounded).

    Each class's drawings are ranked by their place in one random permutation of all drawings (seeded),
    and the parts take the ranks in turn: the first 80% of a class's ranks train, and so on.
    """
    fractions = torch.tensor(fractions, dtype=torch.float64)
    if fractions.ndim != 1 or len(fractions) == 0 or (fractions < 0).any() or abs(fractions.sum() - 1) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions.tolist()}")
    if labels.ndim != 1 or labels.dtype != torch.int64:
        raise ValueError(f"labels must be a 1-D int64 tensor, got {labels.dtype} {tuple(labels.shape)}")
    n = len(labels)
    rank = torch.empty(n, dtype=torch.int64)
    rank[torch.randperm(n, generator=torch.Generator().manual_seed(seed))] = torch.arange(n)
    counts = torch.bincount(labels)  # (C,)
    ends = torch.round(torch.cumsum(fractions[:-1], 0)[:, None] * counts).long().minimum(counts)  # (P-1, C)
    # load_bitmaps groups labels by class, so each class is one slice; otherwise sort to group them.
    grouped = bool((labels[1:] >= labels[:-1]).all())
    by_class = None if grouped else torch.argsort(labels)
    part = torch.empty(n, dtype=torch.int8)
    kth = (ends - 1).clamp(min=0).numpy()  # (P-1, C) positions of each part's last rank, in sorted order
    start = 0
    for c, size in enumerate(counts.tolist()):
        rows = slice(start, start + size) if grouped else by_class[start:start + size]
        start += size
        if size == 0:
            continue
        r = rank[rows]  # (size,)
        # Each part's last rank by selection, not a sort; a drawing's part is how many of those it passes.
        last = torch.from_numpy(np.partition(r.numpy(), kth[:, c])[kth[:, c]])  # (P-1,)
        last[ends[:, c] == 0] = -1  # an empty part ends before every rank
        part[rows] = (r > last[:, None]).sum(0, dtype=torch.int8)
    # numpy finds the positions several times faster than torch.nonzero.
    return tuple(torch.from_numpy(np.flatnonzero(part.numpy() == p)) for p in range(len(fractions)))


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
