"""A packed set: many categories of bitmaps in one memory-mappable folder, split and shuffled once.

    python -m utils.pack --categories all --max-per-class 100000 --data data --out data/packed/all-100k
    python -m utils.pack --verify --out data/packed/all-100k        # full checksum check

Layout of <out>/ (every array a plain .npy, so np.load(..., mmap_mode="r") reads it anywhere):
    {train,val,test}.images.npy   (rows, 784) uint8, the split's drawings in a seeded random order
    {train,val,test}.labels.npy   (rows,) int16, class numbers (classes[i] is label i)
    {train,val,test}.index.npy    (rows,) int64, each row's place in load_bitmaps(classes, max_per_class)
    manifest.json                 written last: classes, seed, counts per split and class, the sources
                                  (size, mtime, SHA-256 of the rows used), size and SHA-256 of every file

The split is stratified_split's (same members for the same categories, rows and seed); each split's rows are
stored in the order of the permutation that split is drawn from, so any long run of them is class-mixed.
Writing is streamed in chunks of that permutation, so memory stays bounded (4 bytes a drawing for the
permutation plus two chunks) whatever the size. An unfinished pack lives in .<name>.partial/ beside <out>,
and rerunning the same command resumes it; <out> only ever appears complete.
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import io
import json
import logging
import math
import mmap
import os
import queue
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from utils.data import SIDE, QuickDrawSet, available_memory, to_float
from utils.download import bitmap_path, category_names, download_bitmaps, resolve_categories
from utils.io import atomic_write, write_json

FORMAT, VERSION = "quickdraw-pack", 1
SPLITS = ("train", "val", "test")
FRACTIONS = (0.8, 0.1, 0.1)
ROW = SIDE * SIDE
KINDS = {"images": (np.uint8, (ROW,)), "labels": (np.int16, ()), "index": (np.int64, ())}  # dtype, row shape
CHUNK_ROWS = 1 << 15  # drawings gathered and written per step of the permutation (25.7 MB of pixels)
PROGRESS_EVERY = 32  # chunks between two resumable progress records (each one fsyncs the files)
BLOCK_ROWS = 1 << 15  # rows a training reader reads in one sequential read (25.7 MB)
BUFFER_BLOCKS = 4  # blocks whose rows are shuffled together
DIRECT_ALIGN = 4096  # O_DIRECT needs file offsets, lengths and memory aligned to the device's block (<= 4 KB)
DIRECT_CHUNK = 1 << 22  # bytes of one direct read; DIRECT_READS of them in flight keep the disk busy
DIRECT_READS = 2
HASH_READ = 1 << 24

log = logging.getLogger(__name__)


class PackError(ValueError):
    """A pack that cannot be used as it is; the message names the folder or file and what is wrong."""


class IncompletePackError(PackError):
    """No manifest: the pack was never finished (or is still being written)."""


class DamagedPackError(PackError):
    """A file of a finished pack is missing, has the wrong size or the wrong checksum."""


class SourceChangedError(PackError):
    """A source .npy no longer holds the rows the pack was made from."""


# ------------------------------------------------------------------------------------------ small helpers

def file_name(split: str, kind: str) -> str:
    return f"{split}.{kind}.npy"


def partial_dir(out) -> Path:
    out = Path(out)
    return out.with_name(f".{out.name}.partial")


def _npy_header(dtype, shape) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                              "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def _sha256(path, start: int = 0, length: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        left = length
        while left is None or left > 0:
            chunk = f.read(HASH_READ if left is None else min(HASH_READ, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    if left:
        raise SourceChangedError(f"{path} ended {left:,} bytes early")
    return h.hexdigest()


def _pread_into(fd: int, offset: int, out, what, need: int | None = None) -> None:
    """Fill out (a C-contiguous array or a byte memoryview) with the bytes at offset, in as few reads as the
    kernel allows; need: the bytes that must come (the rest may lie past the end of the file)."""
    view = memoryview(out).cast("B")
    need, done = len(view) if need is None else need, 0
    while done < need:  # a read may return less than asked
        got = os.preadv(fd, [view[done:]], offset + done)
        if not got:
            raise DamagedPackError(f"{what} ended {need - done:,} bytes early")
        done += got


def _open_direct(path) -> int | None:
    """A read-only descriptor that bypasses the page cache (O_DIRECT), or None where the system or file system
    has none."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except (AttributeError, OSError):
        return None


@contextmanager
def _locked(path: Path):
    """One packer per output folder at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PackError(f"another process is writing {path.with_suffix('')} (it holds {path})") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------ sources

@dataclass
class Source:
    """One category's .npy: where its rows start and how many the pack takes."""
    name: str
    path: Path
    rows_in_file: int
    rows: int  # rows used: the first min(rows_in_file, max_per_class)
    offset: int  # byte offset of row 0
    size: int
    mtime_ns: int

    def identity(self, sha256: str) -> dict:
        return dict(name=self.name, file=str(self.path), rows_in_file=self.rows_in_file, rows=self.rows,
                    header_bytes=self.offset, bytes=self.size, mtime_ns=self.mtime_ns, sha256=sha256)

    def digest(self) -> str:
        """SHA-256 of the bytes of the rows used (reading them also brings them into the page cache)."""
        return _sha256(self.path, self.offset, self.rows * ROW)


def open_source(root, name: str, max_per_class: int | None) -> Source:
    """A category's .npy checked from its header (a C-order (rows, 784) uint8 array), FileNotFoundError if absent."""
    path = bitmap_path(root, name)
    if not path.is_file():
        raise FileNotFoundError(f"no bitmaps for category {name!r}: {path} is missing; fetch it with: "
                                f"python -m utils.download \"{name}\" --root {root}")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            offset, st = f.tell(), os.fstat(f.fileno())
    except Exception as e:
        raise ValueError(f"{path} is not a readable .npy file ({e})") from e
    if dtype != np.uint8 or fortran or len(shape) != 2 or shape[1] != ROW:
        raise ValueError(f"{path} holds {dtype} {shape} (fortran_order={fortran}); expected uint8 (rows, {ROW})")
    if st.st_size < offset + shape[0] * ROW:
        raise ValueError(f"{path} is truncated: {st.st_size - offset:,} bytes of pixels for {shape[0]:,} rows")
    rows = shape[0] if max_per_class is None else min(shape[0], max_per_class)
    return Source(name, path, shape[0], rows, offset, st.st_size, st.st_mtime_ns)


class _SourceMaps:
    """The sources mapped read-only; rows are gathered at random from the page cache.

    Each file's mapping is told MADV_RANDOM (a missing page costs one page, not a 128 KB readahead) and,
    after each gather, MADV_DONTNEED over what it touched: the pages stay in the page cache (shared,
    reclaimable) but leave this process's resident set, which so stays bounded by one gather.
    """

    def __init__(self, sources: list[Source]):
        self.maps, self.arrays = [], []
        for s in sources:
            with open(s.path, "rb") as f:
                m = mmap.mmap(f.fileno(), s.offset + s.rows * ROW, prot=mmap.PROT_READ)
            m.madvise(mmap.MADV_RANDOM)
            self.maps.append(m)
            self.arrays.append(np.frombuffer(m, np.uint8, s.rows * ROW, s.offset).reshape(s.rows, ROW))
        self.offsets = [s.offset for s in sources]

    def gather(self, starts: np.ndarray, positions: np.ndarray, out: np.ndarray) -> None:
        """out[i] = row positions[i] of the concatenated sources (starts: (C+1,) first position of each)."""
        order = np.argsort(positions, kind="stable")
        ordered = positions[order]  # reads in file order: each file's pages are touched front to back
        cuts = np.searchsorted(ordered, starts)  # (C+1,) where each file's rows begin in `ordered`
        for c in np.flatnonzero(np.diff(cuts)):
            a, b = cuts[c], cuts[c + 1]
            rows = ordered[a:b] - starts[c]
            out[order[a:b]] = self.arrays[c][rows]
            first = (self.offsets[c] + int(rows[0]) * ROW) // mmap.PAGESIZE * mmap.PAGESIZE
            self.maps[c].madvise(mmap.MADV_DONTNEED, first, self.offsets[c] + (int(rows[-1]) + 1) * ROW - first)

    def close(self) -> None:
        self.arrays.clear()
        for m in self.maps:
            m.close()


# ------------------------------------------------------------------------------------------ split plan

def split_ends(counts: np.ndarray, fractions=FRACTIONS) -> np.ndarray:
    """(P-1, C) where each part's ranks end in each class: stratified_split's own rounding."""
    f = torch.tensor(fractions, dtype=torch.float64)
    c = torch.from_numpy(np.asarray(counts, dtype=np.int64))
    return torch.round(torch.cumsum(f[:-1], 0)[:, None] * c).long().minimum(c).numpy()


def seeded_permutation(n: int, seed: int) -> np.ndarray:
    """The permutation stratified_split draws its split from (same generator and draws): (n,) int32 below
    2**31 drawings (the same values as torch's int64 default, in half the memory), else int64."""
    dtype = torch.int32 if n < 2**31 else torch.int64
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed), dtype=dtype).numpy()


def assign_parts(positions: np.ndarray, starts: np.ndarray, ends: np.ndarray, seen: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(labels, part) of a run of the permutation; seen (C,) counts each class's drawings met so far (updated).

    stratified_split gives part p to the drawings whose rank among their class's drawings in the permutation
    lies in [ends[p-1], ends[p]); walking the permutation in order and counting per class finds the same.
    """
    labels = np.searchsorted(starts, positions, side="right") - 1  # (k,)
    order = np.argsort(labels, kind="stable")
    grouped = labels[order]
    nth = np.empty(len(labels), dtype=np.int64)
    nth[order] = np.arange(len(labels)) - np.searchsorted(grouped, grouped) + seen[grouped]
    part = (nth[None, :] >= ends[:, labels]).sum(0)  # (k,)
    seen += np.bincount(labels, minlength=len(seen))
    return labels, part


def split_counts(counts: np.ndarray, fractions=FRACTIONS) -> np.ndarray:
    """(P, C) drawings of each class in each part."""
    ends = split_ends(counts, fractions)
    bounds = np.vstack([np.zeros_like(counts), ends, counts])
    return np.diff(bounds, axis=0)


# ------------------------------------------------------------------------------------------ writing

class _Writer:
    """One output .npy: header with the final shape, then rows appended; a running SHA-256."""

    def __init__(self, path: Path, dtype, shape: tuple, resume_bytes: int | None):
        self.path, self.header = path, _npy_header(dtype, shape)
        self.total = len(self.header) + int(np.prod(shape)) * np.dtype(dtype).itemsize
        self.hash = hashlib.sha256()
        if resume_bytes is None:
            self.f = open(path, "wb")
            self.f.write(self.header)
            self.hash.update(self.header)
        else:  # keep what an earlier run recorded as written, hash it again, drop anything after it
            self.f = open(path, "r+b")
            self.f.truncate(resume_bytes)
            with open(path, "rb", buffering=0) as r:
                while chunk := r.read(HASH_READ):
                    self.hash.update(chunk)
            self.f.seek(resume_bytes)

    def write(self, array: np.ndarray) -> None:
        if not array.size:
            return
        data = memoryview(np.ascontiguousarray(array)).cast("B")
        self.f.write(data)
        self.hash.update(data)

    def sync(self) -> int:
        self.f.flush()
        os.fsync(self.f.fileno())
        return self.f.tell()

    def close(self) -> dict:
        size = self.sync()
        self.f.close()
        if size != self.total:
            raise PackError(f"{self.path} holds {size:,} bytes, {self.total:,} expected")
        return dict(bytes=size, sha256=self.hash.hexdigest())


def _plan_key(classes, max_per_class, seed, identities) -> dict:
    """What a pack's content depends on: equal keys, equal bytes."""
    return dict(format=FORMAT, version=VERSION, classes=list(classes), max_per_class=max_per_class, seed=seed,
                fractions=list(FRACTIONS),
                sources=[{k: s[k] for k in ("name", "rows", "header_bytes", "sha256")} for s in identities])


def pack(categories, root="data", out="data/packed/set", max_per_class: int | None = None, seed: int = 0,
         force: bool = False, chunk_rows: int = CHUNK_ROWS, progress: bool = True,
         on_chunk: Callable[[int], None] | None = None) -> Path:
    """Pack the first max_per_class rows of each category's <root>/numpy_bitmap/<name>.npy into `out`.

    Returns `out`. A finished pack of the same sources and settings is kept as it is. A finished pack of
    other ones raises PackError (SourceChangedError if only the sources differ) unless force=True, which
    replaces it. An unfinished one of the same plan is resumed, of another plan started afresh.
    on_chunk(k) is called after chunk k is written (tests use it to interrupt).
    """
    classes = list(categories)
    if not classes:
        raise ValueError("no categories given")
    if len(set(classes)) != len(classes):
        raise ValueError(f"categories repeat: {classes}")
    if len(classes) > np.iinfo(np.int16).max:
        raise ValueError(f"{len(classes)} categories: labels are stored as int16")
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be positive, got {max_per_class}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    out = Path(out)
    with _locked(out.with_name(f".{out.name}.lock")):
        sources = [open_source(root, name, max_per_class) for name in classes]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:  # hashing releases the GIL
            identities = list(pool.map(lambda s: s.identity(s.digest()), sources))
        hash_seconds = time.perf_counter() - t0
        key = _plan_key(classes, max_per_class, seed, identities)
        if (out / "manifest.json").is_file() and not force:
            try:  # asked again: check every byte before saying it is done
                done = PackedSet.open(out, verify=True)
            except DamagedPackError as e:
                log.warning("%s; packing it again", e)
            else:
                if _plan_key(done.classes, done.manifest["max_per_class"], done.manifest["seed"],
                             done.manifest["sources"]) == key:
                    log.info("%s is already packed from these sources", out)
                    return out
                _refuse_other(out, done.manifest, key)
        elif out.exists() and not (out / "manifest.json").is_file() and any(out.iterdir()):
            raise PackError(f"{out} exists and is not a pack; choose another --out or remove it")  # even forced
        tmp = partial_dir(out)
        _write(sources, identities, key, tmp, seed, chunk_rows, progress, on_chunk, hash_seconds)
        if out.exists():  # force: the old pack goes only once the new one is whole
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
        _fsync_dir(out.parent)
    return out


def _refuse_other(out: Path, manifest: dict, key: dict) -> None:
    old = {s["name"]: s for s in manifest["sources"]}
    if [s["name"] for s in key["sources"]] == list(old) and manifest["seed"] == key["seed"] \
            and manifest["max_per_class"] == key["max_per_class"]:
        changed = [f"{old[s['name']]['file']} ({s['name']!r})" for s in key["sources"]
                   if {k: old[s["name"]][k] for k in ("rows", "header_bytes", "sha256")} !=
                   {k: s[k] for k in ("rows", "header_bytes", "sha256")}]
        raise SourceChangedError(f"{out} was packed from other bytes than the current sources hold: "
                                 f"{', '.join(changed)} changed since; rerun with --force to pack them again")
    raise PackError(f"{out} holds another pack ({len(manifest['classes'])} categories, max_per_class "
                    f"{manifest['max_per_class']}, seed {manifest['seed']}); choose another --out or pass --force")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(sources, identities, key, tmp: Path, seed, chunk_rows, progress, on_chunk, hash_seconds) -> None:
    counts = np.array([s.rows for s in sources], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    n = int(starts[-1])
    ends = split_ends(counts)
    per_split = split_counts(counts)  # (3, C)
    shapes = {split: int(per_split[p].sum()) for p, split in enumerate(SPLITS)}
    chunks = -(-n // chunk_rows)

    state = _read_progress(tmp)
    resume = state is not None and state["key"] == key and state["chunk_rows"] == chunk_rows
    if resume:  # every file the record counts on must still hold at least what it recorded
        sizes = {name: (tmp / name).stat().st_size if (tmp / name).is_file() else -1 for name in state["files"]}
        resume = all(sizes[name] >= size for name, size in state["files"].items())
    if state is not None and not resume:
        log.warning("%s was started from other sources or settings, or lost files since; starting over", tmp)
    if not resume:
        shutil.rmtree(tmp, ignore_errors=True)
        state = dict(key=key, chunk_rows=chunk_rows, chunks_done=0, seen=[0] * len(sources), files={})
    tmp.mkdir(parents=True, exist_ok=True)
    writers = {(split, kind): _Writer(tmp / file_name(split, kind), dtype, (shapes[split], *row),
                                      state["files"].get(file_name(split, kind)))
               for split in SPLITS for kind, (dtype, row) in KINDS.items()}
    perm = seeded_permutation(n, seed)  # 4 bytes a drawing: the one thing that grows with the set
    seen = np.array(state["seen"], dtype=np.int64)
    maps = _SourceMaps(sources)
    first = state["chunks_done"]
    # Two pixel buffers in turn: one is gathered into while a thread writes and hashes the other.
    buffers = [np.empty((min(chunk_rows, n), ROW), dtype=np.uint8) for _ in range(2)]
    pending = None
    t0 = time.perf_counter()
    try:
        with tqdm(total=n, initial=min(first * chunk_rows, n), unit="drawing", unit_scale=True, desc="pack",
                  disable=not progress, file=sys.stderr) as bar, ThreadPoolExecutor(1) as pool:
            for k in range(first, chunks):
                positions = perm[k * chunk_rows:(k + 1) * chunk_rows]
                labels, part = assign_parts(positions, starts, ends, seen)
                by_part = np.argsort(part, kind="stable")  # train rows, then val, then test; each in perm order
                rows, labels = positions[by_part].astype(np.int64), labels[by_part].astype(np.int16)
                images = buffers[k % 2][:len(rows)]
                maps.gather(starts, rows, images)
                cuts = np.cumsum(np.bincount(part, minlength=len(SPLITS)))[:-1]
                items = [(writers[split, kind], piece) for kind, array in
                         (("images", images), ("labels", labels), ("index", rows))
                         for split, piece in zip(SPLITS, np.split(array, cuts))]
                if pending is not None:
                    pending.result()
                pending = pool.submit(lambda items: [w.write(a) for w, a in items], items)
                bar.update(len(positions))
                record = (k + 1) % PROGRESS_EVERY == 0 and k + 1 < chunks
                if record or on_chunk is not None:
                    pending.result()
                if record:
                    files = {file_name(*sk): w.sync() for sk, w in writers.items()}
                    write_json(tmp / "progress.json", dict(state, chunks_done=k + 1, seen=seen.tolist(), files=files))
                if on_chunk is not None:
                    on_chunk(k)
            if pending is not None:
                pending.result()
        files = {file_name(*sk): w.close() for sk, w in writers.items()}
    finally:
        maps.close()
        for w in writers.values():
            w.f.close()
    seconds = time.perf_counter() - t0
    manifest = dict(
        format=FORMAT, version=VERSION, classes=key["classes"], max_per_class=key["max_per_class"], seed=seed,
        fractions=list(FRACTIONS), rows={s: shapes[s] for s in SPLITS},
        counts={s: per_split[p].tolist() for p, s in enumerate(SPLITS)}, sources=identities, files=files,
        chunk_rows=chunk_rows, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        seconds=dict(hash_sources=round(hash_seconds, 3), write=round(seconds, 3), resumed_at_chunk=first))
    (tmp / "progress.json").unlink(missing_ok=True)
    _fsync_dir(tmp)
    write_json(tmp / "manifest.json", manifest, indent=1)  # last: its presence means every file is whole


def _read_progress(tmp: Path) -> dict | None:
    try:
        return json.loads((tmp / "progress.json").read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------ reading

def _cgroup_room(proc=Path("/proc/self/cgroup"), root=Path("/sys/fs/cgroup")) -> int | None:
    """Bytes of page cache this process's memory cgroup (v1 or v2) leaves room for: its limit less what its
    processes hold, anonymous memory and mapped files (the libraries' pages); None where there is no limit."""
    try:
        lines = Path(proc).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            folder, limit, held = Path(root) / "memory" / path.lstrip("/"), "memory.limit_in_bytes", \
                ("total_rss", "total_mapped_file")
        elif controllers == "":
            folder, limit, held = Path(root) / path.lstrip("/"), "memory.max", ("anon", "file_mapped")
        else:
            continue
        try:
            value = (folder / limit).read_text().strip()
            stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
        except (OSError, ValueError):
            continue
        if value.isdigit() and int(value) < 1 << 60:  # "max" or a huge number: no limit
            return max(int(value) - sum(int(stat.get(k, 0)) for k in held), 0)
    return None


def cache_room() -> int | None:
    """Bytes of page cache this process can hope to keep: memory available, capped by what its cgroup's limit
    leaves beside the memory its processes hold."""
    room = [x for x in (available_memory(), _cgroup_room()) if x is not None]
    return min(room) if room else None


def shard(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of n rows; shares differ by at most one row and cover all."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    return n * rank // world_size, n * (rank + 1) // world_size


def group_runs(runs: list[tuple[int, int]], rows: int) -> list[list[tuple[int, int]]]:
    """Consecutive runs gathered into buffers of at most `rows` rows (a longer run alone)."""
    groups, n = [], 0
    for a, z in runs:
        if not groups or n + z - a > rows:
            groups.append([])
            n = 0
        groups[-1].append((a, z))
        n += z - a
    return groups


def layout(group: list[tuple[int, int]], head: int, offset: int, align: int | None = None
           ) -> tuple[list[tuple[int, int]], list[tuple[int, int, int, int]], int]:
    """Where a buffer of (rows, 784) holds a group's runs: (segments, reads, rows).

    segments: [p, q) buffer rows of each run, in order, all at or after row `head`; reads: (file offset, byte in
    the buffer, bytes, bytes needed) that fill them, offset being the file's byte of row 0; rows: the buffer's
    rows needed. align=None: runs end to end, each read as it is. align=A: each read an A-aligned span (what
    O_DIRECT asks of the file offset, the length and the memory, the buffer starting on an A boundary), the run
    placed where the buffer's bytes agree with the file's modulo A; the span's ends spill up to A bytes past
    the run's rows, into gap rows that no other run uses.
    """
    segments, reads, cursor = [], [], head * ROW  # cursor: the first byte no read has touched
    for a, z in group:
        f, size = offset + a * ROW, (z - a) * ROW
        if align is None:
            p, start, span = cursor // ROW, f, size
        else:
            d = f % align
            period = align // math.gcd(ROW, align)  # rows after which the buffer's alignment repeats
            first = -(-(cursor + d) // ROW)
            fits = np.flatnonzero((np.arange(first, first + period) * ROW - d) % align == 0)
            if not len(fits):
                raise ValueError(f"rows at byte {f} cannot be aligned to {align} bytes in a buffer of {ROW}-byte rows")
            p, start, span = first + int(fits[0]), f - d, -(-(d + size) // align) * align
        reads.append((start, p * ROW - (f - start), span, f - start + size))
        segments.append((p, p + z - a))
        cursor = p * ROW - (f - start) + span
    return segments, reads, -(-cursor // ROW)


def aligned_rows(rows: int, align: int = DIRECT_ALIGN) -> np.ndarray:
    """An empty (rows, 784) uint8 array whose first byte lies on an align boundary."""
    raw = np.empty(rows * ROW + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + rows * ROW].reshape(rows, ROW)


class PackedSplit:
    """One split of a pack: memory-mapped arrays and streamed iterators over them."""

    def __init__(self, pack: "PackedSet", name: str):
        self.pack, self.name, self.classes = pack, name, pack.classes
        self.paths = {kind: pack.path / file_name(name, kind) for kind in KINDS}
        self.images = np.load(self.paths["images"], mmap_mode="r")  # (n, 784) uint8
        self.labels = np.load(self.paths["labels"], mmap_mode="r")  # (n,) int16
        self.index = np.load(self.paths["index"], mmap_mode="r")  # (n,) int64
        self.offsets = {"images": self.images.offset, "labels": self.labels.offset}  # bytes before row 0
        self._reader: tuple[threading.Thread, dict] | None = None  # the last call's reader and its buffers

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self) -> torch.Tensor:
        """Drawings per class, (C,) int64 (from the manifest)."""
        return torch.tensor(self.pack.manifest["counts"][self.name], dtype=torch.int64)

    def num_batches(self, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
        """Batches each rank's batches() yields per epoch (the same on every rank)."""
        per_rank = len(self) // world_size
        return per_rank // batch_size if drop_last else -(-per_rank // batch_size)

    def _epoch_runs(self, epoch: int, seed: int, rank: int, world_size: int, block_rows: int
                    ) -> list[tuple[int, int]]:
        """This rank's share of the epoch as [start, stop) runs of rows, each at most one block long.

        The epoch reads the blocks in an order drawn from (seed, epoch); rank r takes rows [r*L, (r+1)*L)
        of that stream, L = n // world_size, so shares are disjoint, equal, and together miss only the
        n % world_size rows at the stream's end (a different few each epoch, as the block order changes).
        """
        n = len(self)
        blocks = -(-n // block_rows)
        order = torch.randperm(blocks, generator=torch.Generator().manual_seed(seed * 10_007 + epoch)).tolist()
        per_rank = n // world_size
        lo, hi = rank * per_rank, (rank + 1) * per_rank
        runs, at = [], 0  # at: position in the epoch's stream
        for b in order:
            start, stop = b * block_rows, min((b + 1) * block_rows, n)
            a, z = max(lo, at), min(hi, at + stop - start)
            if a < z:
                runs.append((start + a - at, start + z - at))
            at += stop - start
            if at >= hi:
                break
        return runs

    def batches(self, batch_size: int, epoch: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1,
                block_rows: int = BLOCK_ROWS, buffer_blocks: int = BUFFER_BLOCKS, drop_last: bool = False,
                direct: bool | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of this rank's share as (images uint8 (B,28,28), labels int64 (B,)), on the CPU.

        Reads blocks of block_rows consecutive rows in an order reshuffled every epoch (seed, epoch), and
        shuffles rows within a buffer of buffer_blocks blocks. Every rank yields num_batches(batch_size,
        world_size, drop_last) batches; the last is shorter unless drop_last. Threads read the next buffer
        straight into place while this one is served, and once the epoch is read, the first buffer of the
        next (epoch + 1, same arguments), which the next call takes over. Memory is two buffers, about
        2 * buffer_blocks * block_rows * 786 bytes (206 MB by default), whatever the split's size.
        direct: read around the page cache (O_DIRECT); None: where the split is larger than the cache can keep.
        The batches are the same whichever way the rows are read.
        """
        if batch_size < 1 or block_rows < 1 or buffer_blocks < 1:
            raise ValueError(f"batch_size, block_rows and buffer_blocks must be positive "
                             f"(got {batch_size}, {block_rows}, {buffer_blocks})")
        rows = buffer_blocks * block_rows
        groups = group_runs(self._epoch_runs(epoch, seed, rank, world_size, block_rows), rows)
        after = group_runs(self._epoch_runs(epoch + 1, seed, rank, world_size, block_rows), rows)[:1]
        g = torch.Generator().manual_seed((seed * 10_007 + epoch) * 1_009 + rank)
        head = batch_size  # room before the rows read, for the previous buffer's leftover (< batch_size)
        rest_images, rest_labels = np.empty((0, ROW), np.uint8), np.empty(0, np.int16)
        for images, labels, segments in self._fill(groups, head, direct, after):
            lo = head - len(rest_images)
            images[lo:head], labels[lo:head] = rest_images, rest_labels
            held = np.concatenate([np.arange(lo, head), *(np.arange(p, q) for p, q in segments)])
            order = held[torch.randperm(len(held), generator=g).numpy()]
            full = len(order) - len(order) % batch_size
            for i in range(0, full, batch_size):
                take = order[i:i + batch_size]
                yield (torch.from_numpy(np.take(images, take, axis=0)).view(-1, SIDE, SIDE),
                       torch.from_numpy(np.take(labels, take).astype(np.int64)))
            rest_images, rest_labels = np.take(images, order[full:], axis=0), np.take(labels, order[full:])
        if len(rest_labels) and not drop_last:
            yield (torch.from_numpy(rest_images).view(-1, SIDE, SIDE),
                   torch.from_numpy(rest_labels.astype(np.int64)))

    def reads_directly(self, direct: bool | None = None) -> bool:
        """Whether the images are read around the page cache (O_DIRECT): asked for, or (None) where the split is
        larger than the cache can keep; only where the system has O_DIRECT and rows can be aligned."""
        if direct is None:
            room = cache_room()
            direct = room is not None and self.images.nbytes > room
        return bool(direct) and hasattr(os, "O_DIRECT") and self.offsets["images"] % math.gcd(ROW, DIRECT_ALIGN) == 0

    def _fill(self, groups: list[list[tuple[int, int]]], head: int, direct: bool | None = None,
              after: list[list[tuple[int, int]]] = ()) -> Iterator[tuple[np.ndarray, np.ndarray, list]]:
        """(images (R, 784), labels (R,), segments) for each group of runs: two buffers in turn, a group's runs
        read into rows [p, q) of one (segments, all at or after row head) by a background thread while the
        consumer serves the other. Once the last is read, the group in `after` (the next call's first) is read
        ahead into the free buffer; a call starting with that group takes it over."""
        direct = self.reads_directly(direct)
        align, offset = (DIRECT_ALIGN if direct else None), self.offsets["images"]
        ahead, buffers = self._settle((groups[:1], head, align))
        todo = [(group, *layout(group, head, offset, align)) for group in [*groups[bool(ahead):], *after[:1]]]
        rows = max([r for *_, r in todo], default=head)
        # The last call's buffers serve again where their size fits: fresh ones cost a page fault per 4 KB.
        buffers = [b for b in buffers if b is ahead or rows <= len(b[1]) <= rows + rows // 4]
        buffers += [(aligned_rows(rows), np.empty(rows, np.int16)) for _ in range(2 - len(buffers))]
        # A split read in a cycle that the cache cannot hold gets no cache hits (LRU evicts each page before its
        # next epoch). Read directly, its pages never enter the cache: no kernel copy, no readahead past a block
        # into one not read next, and nothing else cached (other ranks' pages, the libraries) is evicted for it.
        # Read through the cache where O_DIRECT is not to be had, its pages are dropped once read.
        room = cache_room()
        uncacheable = room is not None and self.images.nbytes > room
        free: queue.Queue = queue.Queue()
        full: queue.Queue = queue.Queue()
        for b in buffers:
            if b is not ahead:
                free.put(b)
        if ahead is not None:
            full.put((ahead, layout(groups[0], head, offset, align)[0]))
        epoch_reads = len(groups) - bool(ahead)  # todo's first entries; the rest is read ahead
        stop = threading.Event()
        state = dict(buffers=buffers, ahead=None)

        def take_free():
            while not stop.is_set():
                try:
                    buf = free.get(timeout=0.1)
                except queue.Empty:
                    continue
                if len(buf[1]) < rows:  # a buffer of the last call, whose gaps were fewer
                    buffers[next(i for i, b in enumerate(buffers) if b is buf)] = buf = \
                        (aligned_rows(rows), np.empty(rows, np.int16))
                return buf
            return None

        def reader():
            ended = False  # whether the consumer has been told the epoch is read
            try:
                with open(self.paths["images"], "rb", buffering=0) as fi, \
                        open(self.paths["labels"], "rb", buffering=0) as fl, \
                        ThreadPoolExecutor(DIRECT_READS if direct else 1) as pool:
                    fd = _open_direct(self.paths["images"]) if direct else None
                    drop_behind = fd is None and uncacheable
                    if fd is None:
                        os.posix_fadvise(fi.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)

                    images_fd = fi.fileno() if fd is None else fd

                    refused = threading.Event()  # a direct read refused once: the rest go through the cache

                    def run(job):
                        f, at, out, need = job
                        what = self.paths["labels" if f == fl.fileno() else "images"]
                        if f == fd and refused.is_set():
                            f = fi.fileno()
                        try:
                            _pread_into(f, at, out, what, need)
                        except OSError as e:  # an alignment this file system or device refuses: through the cache
                            if f != fd or e.errno != errno.EINVAL:
                                raise
                            refused.set()
                            _pread_into(fi.fileno(), at, out, what, need)

                    try:
                        for k, (group, segments, reads, _) in enumerate(todo):
                            if k == epoch_reads:
                                full.put(None)
                                ended = True
                            if (buf := take_free()) is None:
                                return
                            images, labels = buf
                            flat = memoryview(images).cast("B")
                            jobs = [(fl.fileno(), self.offsets["labels"] + a * 2, labels[p:q], None)
                                    for (a, _), (p, q) in zip(group, segments)]
                            for at, pos, span, need in reads:  # direct: in chunks, DIRECT_READS at a time
                                step = DIRECT_CHUNK if fd is not None else span
                                jobs += [(images_fd, at + c, flat[pos + c:pos + min(span, c + step)],
                                          min(step, need - c)) for c in range(0, span, step)]
                            list(pool.map(run, jobs))
                            if drop_behind:
                                for a, z in group:
                                    os.posix_fadvise(fi.fileno(), offset + a * ROW, (z - a) * ROW,
                                                     os.POSIX_FADV_DONTNEED)
                            if k < epoch_reads:
                                full.put((buf, segments))
                            else:
                                state["ahead"] = ((after[:1], head, align), buf)
                    finally:
                        if fd is not None:
                            os.close(fd)
                if not ended:
                    full.put(None)
            except BaseException as e:  # hand the failure to the consumer (a read ahead's is left to the next call)
                if not ended:
                    full.put(e)

        thread = threading.Thread(target=reader, daemon=True, name=f"pack-reader-{self.name}")
        thread.start()
        held, done = None, False
        try:
            while (item := full.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                if held is not None:
                    free.put(held)  # the consumer has moved its leftover out of it by now
                held, segments = item
                yield (*held, segments)
            done = True
        finally:
            if not done:
                stop.set()
            self._reader = (thread, state)  # waited for by the next call, which may take over its read ahead

    def _settle(self, key) -> tuple[tuple[np.ndarray, np.ndarray] | None, list]:
        """Wait for the last call's reader: (its read-ahead buffer if it holds key's group, else None; its buffers)."""
        if self._reader is None:
            return None, []
        thread, state = self._reader
        self._reader = None
        thread.join()
        ahead = state["ahead"]
        return (ahead[1] if ahead is not None and ahead[0] == key else None), state["buffers"]

    def ordered(self, batch_size: int = 1024, rank: int = 0, world_size: int = 1, block_rows: int = BLOCK_ROWS,
                direct: bool | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Rank's contiguous share (shard()) of the split in stored order, as batches (uint8 (B,28,28), int64 (B,)).

        Results of ranks 0..K-1 put end to end are those of one process over the whole split, row for row.
        """
        start, stop = shard(len(self), rank, world_size)
        step = max(block_rows // batch_size, 1) * batch_size  # whole batches per read
        groups = [[(a, min(a + step, stop))] for a in range(start, stop, step)]
        for images, labels, [(p, q)] in self._fill(groups, 0, direct):
            for i in range(p, q, batch_size):  # copies: the buffer is refilled once the caller moves on
                j = min(i + batch_size, q)
                yield (torch.from_numpy(images[i:j].copy()).view(-1, SIDE, SIDE),
                       torch.from_numpy(labels[i:j].astype(np.int64)))

    def load(self) -> QuickDrawSet:
        """The whole split in memory, as load_bitmaps + split would give it (MemoryError if it cannot fit)."""
        need, available = len(self) * (ROW + 8), available_memory()
        if available is not None and need > available:
            raise MemoryError(f"the {self.name} split of {self.pack.path} needs {need / 2**30:.1f} GiB; "
                              f"{available / 2**30:.1f} GiB is available: stream it with ordered() instead")
        parts = list(self.ordered(batch_size=BLOCK_ROWS))
        images = torch.cat([x for x, _ in parts]) if parts else torch.empty((0, SIDE, SIDE), dtype=torch.uint8)
        labels = torch.cat([y for _, y in parts]) if parts else torch.empty(0, dtype=torch.int64)
        return QuickDrawSet(images, labels, self.classes)


def device_batches(batches, device="cpu", transform: Callable[[torch.Tensor], torch.Tensor] | None = None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 batches -> (x float32 (B,1,28,28), y int64 (B,)) on device, as utils.data.iterate_batches yields:
    the uint8 bytes are moved (4x fewer than floats) and made float on the device."""
    device = torch.device(device)
    pin = device.type == "cuda"
    for x, y in batches:
        if pin:
            x, y = x.pin_memory(), y.pin_memory()
        x = to_float(x.to(device, non_blocking=True))
        y = y.to(device, non_blocking=True)
        yield (transform(x) if transform is not None else x), y


class PackedSet:
    """A finished pack, opened: PackedSet.open(path).train / .val / .test are PackedSplit views."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = path, manifest
        self.classes: list[str] = manifest["classes"]
        self.splits = {name: PackedSplit(self, name) for name in SPLITS}
        self.train, self.val, self.test = (self.splits[name] for name in SPLITS)

    @classmethod
    def open(cls, path, verify: bool = False) -> "PackedSet":
        """Open a pack, checking that every file is there with its recorded size (cheap); verify=True also
        checks every file's SHA-256 (reads the whole pack). Raises IncompletePackError or DamagedPackError."""
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            if partial_dir(path).is_dir():
                raise IncompletePackError(f"{path} is not finished: {partial_dir(path)} holds an interrupted pack; "
                                          f"rerun the same python -m utils.pack command to resume it")
            what = "has no manifest.json" if path.is_dir() else "does not exist"
            raise IncompletePackError(f"{path} {what}: not a finished pack (make one with python -m utils.pack)")
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
                raise ValueError(f"format {manifest.get('format')!r} version {manifest.get('version')!r}")
            files = manifest["files"]
        except (ValueError, KeyError, AttributeError) as e:
            raise DamagedPackError(f"{manifest_path} is not a pack manifest this code reads ({e})") from None
        for name, rec in files.items():
            f = path / name
            if not f.is_file():
                raise DamagedPackError(f"{f} is missing from the pack")
            size = f.stat().st_size
            if size != rec["bytes"]:
                raise DamagedPackError(f"{f} is {'truncated' if size < rec['bytes'] else 'too long'}: "
                                       f"{size:,} bytes, the manifest records {rec['bytes']:,}")
        if verify:
            cls.verify_files(path, manifest)
        try:
            return cls(path, manifest)
        except ValueError as e:  # a header that does not parse, though the size is right
            raise DamagedPackError(f"{path}: {e}") from None

    @staticmethod
    def verify_files(path: Path, manifest: dict) -> None:
        for name, rec in manifest["files"].items():
            if _sha256(path / name) != rec["sha256"]:
                raise DamagedPackError(f"{path / name} does not match its checksum in the manifest: "
                                       f"its bytes changed since it was written; pack again")

    def verify(self) -> None:
        """Every file's SHA-256 against the manifest (DamagedPackError naming the first that differs)."""
        self.verify_files(self.path, self.manifest)

    def check_sources(self) -> list[str]:
        """Sources whose rows differ from those packed (SourceChangedError); missing ones are listed, not errors."""
        missing = []
        for s in self.manifest["sources"]:
            p = Path(s["file"])
            if not p.is_file():
                missing.append(str(p))
                continue
            st = p.stat()
            if (st.st_size, st.st_mtime_ns) == (s["bytes"], s["mtime_ns"]):
                continue  # untouched since it was hashed
            try:
                same = _sha256(p, s["header_bytes"], s["rows"] * ROW) == s["sha256"]
            except SourceChangedError:
                same = False
            if not same:
                raise SourceChangedError(f"{p} ({s['name']!r}) changed since {self.path} was packed from it: "
                                         f"the first {s['rows']:,} rows differ")
        return missing

    def __repr__(self) -> str:
        rows = ", ".join(f"{s} {len(self.splits[s]):,}" for s in SPLITS)
        return f"PackedSet({str(self.path)!r}: {len(self.classes)} classes; {rows})"


# ------------------------------------------------------------------------------------------ command line

def _categories(values: list[str]) -> list[str]:
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    return category_names() if names == ["all"] else resolve_categories(names)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m utils.pack", description=__doc__.split("\n\n")[0])
    p.add_argument("--categories", nargs="+", help='"all" or official names: cat "alarm clock" (or comma-separated)')
    p.add_argument("--max-per-class", type=int, help="first N drawings of each category (default: all)")
    p.add_argument("--data", default="data", help="folder of the bitmaps; missing ones are downloaded into it")
    p.add_argument("--out", required=True, help="the pack's folder, e.g. data/packed/all-100k")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of the stored order")
    p.add_argument("--base-url", help="bucket root or mirror (URL or folder); default: $QUICKDRAW_BASE_URL or the bucket")
    p.add_argument("--no-download", action="store_true", help="use the files under --data as they are")
    p.add_argument("--force", action="store_true", help="replace a finished pack of other sources or settings")
    p.add_argument("--verify", action="store_true", help="check every file's SHA-256 (alone: only that)")
    p.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        if args.categories:
            names = _categories(args.categories)
            if not args.no_download:
                download_bitmaps(names, root=args.data, max_per_class=args.max_per_class, base_url=args.base_url,
                                 progress=not args.no_progress)
            pack(names, args.data, args.out, args.max_per_class, args.seed, args.force, args.chunk_rows,
                 progress=not args.no_progress)
        elif not args.verify:
            p.error("give --categories (to pack) or --verify (to check a pack)")
        ps = PackedSet.open(args.out, verify=args.verify)
    except (PackError, ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    m = ps.manifest
    print(f"{ps!r}\n{sum(r['bytes'] for r in m['files'].values()) / 1e9:.2f} GB; "
          f"{'checksums verified' if args.verify else 'sizes checked (--verify checks checksums)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
