"""Quick, Draw! downloads: numpy bitmaps and ndjson strokes, first N rows only, cached and resumable.

The source is the bucket root (or a mirror of its layout, over http(s) or in a local folder):
    <base>/full/numpy_bitmap/<name>.npy     (rows, 784) uint8, 50 to 300 MB each
    <base>/full/<kind>/<name>.ndjson        one drawing a line, kind "simplified" or "raw"
With max_per_class=N only the bytes the first N rows occupy are moved (HTTP Range requests).

Local layout under root (default "data"):
    numpy_bitmap/<name>.npy        a valid .npy of the first rows
    numpy_bitmap/<name>.npy.json   what the file holds: rows, size, complete or not, and which remote file
                                   (URL, size, ETag/Last-Modified, header) the rows came from
    numpy_bitmap/<name>.npy.part   raw remote bytes of an unfinished download, resumed from its length
    numpy_bitmap/<name>.npy.part.json  which remote file those bytes came from
    numpy_bitmap/<name>.npy.lock   locked while the file is being fetched
    <kind>/<name>.ndjson (+ .json, .part, ...) likewise
Cached bytes are reused only for the same URL and the same remote file (utils.fetch says how a resume
makes sure of it). Every body is checked to be what it claims to be: a .npy of uint8 rows whose header
agrees with the file's size, or lines of JSON drawings; not an HTML page.

    python -m utils.download cat "alarm clock" --max-per-class 5000 --root data/
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import threading
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from utils.categories import category_names, resolve_categories
from utils.fetch import (IDENTITY, CorruptFileError, DownloadError, FetchSettings, fetch_prefix, file_size, origin,
                         read_json, read_tail, tag_path)
from utils.formats import KINDS, SIDE
from utils.io import atomic_write, write_json
from utils.npy import MAX_HEADER, NpyHeaderError, read_header

DEFAULT_BASE_URL = "https://storage.googleapis.com/quickdraw_dataset/"
BASE_URL_ENV = "QUICKDRAW_BASE_URL"
ROW_BYTES = SIDE * SIDE
GUESSED_HEADER = 128  # numpy pads .npy headers to a multiple of 64 bytes (older versions: 16, giving 80)

log = logging.getLogger(__name__)


@dataclass
class Fetched:
    """What the download of one category did."""
    path: Path
    rows: int
    bytes_moved: int  # bytes read from the source by this call (0: served from the cache)
    complete: bool  # the local file holds every row of the remote file


def resolve_base_url(base_url: str | None = None) -> str:
    """Argument, else $QUICKDRAW_BASE_URL, else the official bucket; an http(s) URL ending in "/" or a folder."""
    origin = "base_url"
    if not base_url and os.environ.get(BASE_URL_ENV):
        base_url, origin = os.environ[BASE_URL_ENV], BASE_URL_ENV
    base = str(base_url or DEFAULT_BASE_URL)
    if base.startswith(("http://", "https://")):
        return base if base.endswith("/") else base + "/"
    if base.startswith("file://"):
        base = urllib.request.url2pathname(urllib.parse.urlsplit(base).path)
    folder = Path(base).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{origin} {str(base_url)!r} is neither an http(s):// URL nor an existing folder")
    return str(folder.resolve())


def bitmap_path(root, name) -> Path:
    return Path(root) / "numpy_bitmap" / f"{name}.npy"


def strokes_path(root, name, kind) -> Path:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    return Path(root) / kind / f"{name}.ndjson"


def _source(base: str, folder: str, filename: str) -> str | Path:
    if base.startswith(("http://", "https://")):
        return f"{base}full/{folder}/{urllib.parse.quote(filename)}"
    return Path(base) / "full" / folder / filename


# ---------------------------------------------------------------------------------------- file formats
# A format says how many bytes of the remote file N rows need, checks them, and turns that prefix into
# the local file; fetching, caching and resuming are shared (_fetch_one).

def _read_head(path: Path, n: int = MAX_HEADER) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _npy_header(head: bytes, what):
    try:
        found = read_header(head, what, ROW_BYTES)
    except NpyHeaderError as e:
        raise CorruptFileError(str(e)) from None
    if found is not None and found.fortran_order:
        raise CorruptFileError(f"{what} is in Fortran order: its rows are not contiguous bytes")
    return found


def _line_end(path: Path, n: int) -> tuple[int, int | None]:
    """(complete lines among the first n, offset just past the n-th or None if there are fewer)."""
    with open(path, "rb") as f:
        for i in range(n):
            if not f.readline().endswith(b"\n"):
                return i, None
        return n, f.tell()


class _Bitmap:
    folder, suffix = "numpy_bitmap", ".npy"

    def local_path(self, root, name) -> Path:
        return bitmap_path(root, name)

    def head_size(self, path: Path) -> int:
        found = _npy_header(_read_head(path), path)
        if found is None:
            raise CorruptFileError(f"{path} ends inside its .npy header")
        return found.size

    def plan(self, part: Path, n: int | None, total: int | None, what) -> tuple[int | None, int | None]:
        """(bytes needed or None while the header is incomplete, end of the next request or None for all)."""
        found = _npy_header(_read_head(part), what)
        if found is None:
            if total is not None and file_size(part) >= total:
                raise CorruptFileError(f"{what} ends inside its .npy header ({total} bytes)")
            # One request usually brings the header and the rows; a longer header costs a second one.
            return None, None if n is None else GUESSED_HEADER + n * ROW_BYTES
        whole = found.size + found.rows * ROW_BYTES
        if total is not None and total != whole:
            raise CorruptFileError(f"{what} ends at {total:,} bytes; its .npy header promises {whole:,} "
                                   f"({found.rows:,} rows of {ROW_BYTES})")
        need = found.size + ROW_BYTES * (found.rows if n is None else min(n, found.rows))
        return need, need

    def overlap(self, part: Path) -> int:
        return min(file_size(part), ROW_BYTES)

    def write(self, part: Path, need: int, out, what) -> int:
        with open(part, "rb") as src:
            size = _npy_header(src.read(MAX_HEADER), what).size
            rows = (need - size) // ROW_BYTES
            np.lib.format.write_array_header_1_0(
                out, {"descr": "|u1", "fortran_order": False, "shape": (rows, ROW_BYTES)})
            src.seek(size)
            _copy(src, out, rows * ROW_BYTES)
        return rows

    def rows(self, path: Path) -> int:
        """Rows of a valid local file; CorruptFileError naming it otherwise."""
        found = _npy_header(_read_head(path), path)
        if found is None or file_size(path) != found.size + found.rows * ROW_BYTES:
            raise CorruptFileError(f"{path} has {file_size(path)} bytes; its .npy header "
                                   + (f"promises {found.size + found.rows * ROW_BYTES} ({found.rows} rows)"
                                      if found else "is incomplete"))
        return found.rows


@dataclass(frozen=True)
class _Strokes:
    folder: str  # "simplified" or "raw"
    suffix = ".ndjson"

    def local_path(self, root, name) -> Path:
        return strokes_path(root, name, self.folder)

    def head_size(self, path: Path) -> int:
        return 0

    def plan(self, part: Path, n: int | None, total: int | None, what) -> tuple[int | None, int | None]:
        have = file_size(part)
        lines, end = _line_end(part, n) if n is not None else (0, None)
        if end is not None:
            return end, end
        if total is not None and have >= total:
            return total, total  # fewer than n lines: all of them
        if n is None:
            return None, None
        # Lines vary in length: aim at n lines from the mean so far, 10% over, so one more request usually does.
        guess = int(have / lines * n * 1.1) if lines else max(2 * have, n * 1024)
        return None, max(guess, have + (1 << 14))

    def overlap(self, part: Path) -> int:
        """The last line kept (or its start so far), at least 1 KiB of it where there is as much."""
        tail = read_tail(part, 1 << 16)
        return max(len(tail) - tail.rfind(b"\n", 0, len(tail) - 1) - 1, min(len(tail), 1024))

    def write(self, part: Path, need: int, out, what) -> int:
        """Copy the first `need` bytes, each line checked to be a JSON object with a "drawing"."""
        rows = 0
        with open(part, "rb") as src:
            while src.tell() < need:
                line, rows = src.readline(need - src.tell()), rows + 1
                try:
                    drawing = json.loads(line)
                except ValueError:
                    drawing = None
                if not (isinstance(drawing, dict) and "drawing" in drawing):
                    kind = "an HTML page" if line.lstrip()[:1] == b"<" else "not a JSON drawing"
                    raise CorruptFileError(f"{what}: line {rows} is {kind} (it starts with {line[:40]!r})")
                out.write(line)
        return rows

    def rows(self, path: Path) -> int:
        with open(path, "rb") as f:
            return sum(1 for _ in f)  # a last line without its newline counts too


BITMAP = _Bitmap()


def _copy(src, dst, n: int) -> None:
    while n > 0:
        chunk = src.read(min(n, 1 << 20))
        if not chunk:
            raise CorruptFileError(f"{getattr(src, 'name', src)} ended {n} bytes early")
        dst.write(chunk)
        n -= len(chunk)


# ---------------------------------------------------------------------------------------- cache

def _sidecar(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def _cached_rows(fmt, out: Path, meta: dict) -> int | None:
    """Rows of a valid cached file, or None (a corrupt one is deleted so nothing loads it)."""
    if not out.exists():
        return None
    try:
        rows = fmt.rows(out)
        if (meta.get("bytes"), meta.get("rows")) != (file_size(out), rows):
            raise CorruptFileError(f"{out} has {file_size(out)} bytes and {rows} rows; {_sidecar(out)} "
                                   f"records {meta.get('bytes')} bytes and {meta.get('rows')} rows")
        return rows
    except CorruptFileError as e:
        log.warning("%s; fetching it again", e)
        out.unlink()
        return None


def _seed_part(fmt, out: Path, meta: dict, part: Path) -> None:
    """Rebuild the remote prefix from the cached file, so that growing it fetches only the missing bytes."""
    tag = {k: meta.get(k) for k in ("source", *IDENTITY)}
    head = bytes.fromhex(meta["remote_head"])
    offset = fmt.head_size(out)
    if part.exists() and read_json(tag_path(part)) == tag and file_size(part) >= len(head) + file_size(out) - offset:
        return  # an interrupted download of the same remote file went further: resume that
    tag_path(part).unlink(missing_ok=True)
    with atomic_write(part) as f, open(out, "rb") as src:
        f.write(head)
        src.seek(offset)
        shutil.copyfileobj(src, f)
    write_json(tag_path(part), tag)


def _fetch_one(fmt, name: str, root, n: int | None, base: str, settings: FetchSettings,
               meter: Callable[[int], None]) -> Fetched:
    out = fmt.local_path(root, name)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out.with_name(out.name + ".lock"))  # one fetch of a file at a time, across processes
    try:
        lock.acquire(blocking=False)
    except Timeout:
        log.info("%s is being fetched by another download; waiting for it", out)
        lock.acquire()
    try:
        got = _fetch_locked(fmt, out, n, _source(base, fmt.folder, name + fmt.suffix), settings, meter)
    finally:
        lock.release()
    if n is not None and got.rows < n:
        log.warning("%s: %d rows available, %d asked (the source file holds no more)", name, got.rows, n)
    return got


def _fetch_locked(fmt, out: Path, n: int | None, source, settings: FetchSettings,
                  meter: Callable[[int], None]) -> Fetched:
    part, sidecar = out.with_name(out.name + ".part"), _sidecar(out)
    meta, rows = read_json(sidecar), None
    if out.exists() and origin(meta) != str(source):
        log.warning("%s was fetched from %s, not from %s; discarding the cached bytes and fetching from the "
                    "start", out, origin(meta), source)
    else:
        rows = _cached_rows(fmt, out, meta)
    if rows is not None:
        complete = bool(meta.get("complete"))
        if complete or (n is not None and rows >= n):
            return Fetched(out, rows, 0, complete)
        _seed_part(fmt, out, meta, part)
    moved = 0

    def count(k: int) -> None:
        nonlocal moved
        moved += k
        meter(k)

    try:
        need, tag = fetch_prefix(source, part, lambda total: fmt.plan(part, n, total, source),
                                 lambda: fmt.overlap(part), settings, count)
        total = tag.get("remote_bytes")
        with atomic_write(out) as f:
            rows = fmt.write(part, need, f, source)
            meta = {"source": str(source), "rows": rows, "bytes": f.tell(),
                    "complete": total is not None and need >= total, **{k: tag.get(k) for k in IDENTITY},
                    "remote_head": _read_head(part)[:fmt.head_size(part)].hex()}
            sidecar.unlink(missing_ok=True)  # a file is trusted only with a sidecar written after it
        write_json(sidecar, meta)
    except CorruptFileError:
        for path in (tag_path(part), part):  # whatever was wrong with these bytes, the next run starts afresh
            path.unlink(missing_ok=True)
        raise
    if fmt.rows(out) != rows or file_size(out) != meta["bytes"]:
        raise CorruptFileError(f"{out} does not read back as the {rows} rows just written")
    tag_path(part).unlink()
    part.unlink()
    return Fetched(out, rows, moved, meta["complete"])


def _download(fmt, categories, root, max_per_class, base_url, workers, progress, settings,
              stats) -> dict[str, Path]:
    names = resolve_categories(categories)
    if max_per_class is not None and (isinstance(max_per_class, bool) or not isinstance(max_per_class, int)
                                      or max_per_class < 1):
        raise ValueError(f"max_per_class must be a positive int or None, not {max_per_class!r}")
    base = resolve_base_url(base_url)
    settings = settings or FetchSettings()
    lock = threading.Lock()
    results, errors = {}, {}
    with tqdm(total=len(names), unit="cat", desc=fmt.folder, disable=not progress, position=0) as done, \
            tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="moved", disable=not progress,
                 position=1) as moved:
        def meter(k: int) -> None:
            with lock:
                moved.update(k)

        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(names) or 1))) as pool:
            jobs = {pool.submit(_fetch_one, fmt, name, root, max_per_class, base, settings, meter): name
                    for name in names}
            for job in as_completed(jobs):
                try:
                    results[jobs[job]] = job.result()
                except Exception as e:  # let the other categories finish; report every failure below
                    errors[jobs[job]] = e
                with lock:
                    done.update(1)
    if stats is not None:
        stats.update((name, results[name]) for name in names if name in results)
    if len(errors) == 1:
        raise next(iter(errors.values()))
    if errors:
        raise DownloadError(f"{len(errors)} categories failed:\n" +
                            "\n".join(f"  {name}: {e}" for name, e in errors.items())) from next(iter(errors.values()))
    return {name: results[name].path for name in names}


def download_bitmaps(categories, root="data", max_per_class=None, base_url=None, workers=4, progress=True,
                     *, settings: FetchSettings | None = None, stats: dict | None = None) -> dict[str, Path]:
    """First max_per_class rows (all if None) of each category's bitmaps as <root>/numpy_bitmap/<name>.npy.

    A cached file already holding the rows asked for is kept as it is (it may hold more). `stats`, if a
    dict, receives a Fetched per category (rows, bytes moved)."""
    return _download(BITMAP, categories, root, max_per_class, base_url, workers, progress, settings, stats)


def download_strokes(categories, kind="simplified", root="data", max_per_class=None, base_url=None, workers=4,
                     progress=True, *, settings: FetchSettings | None = None,
                     stats: dict | None = None) -> dict[str, Path]:
    """First max_per_class lines (all if None) of each category's ndjson as <root>/<kind>/<name>.ndjson."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    return _download(_Strokes(kind), categories, root, max_per_class, base_url, workers, progress, settings,
                     stats)


# ---------------------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m utils.download", description=__doc__.split("\n\n")[0])
    p.add_argument("categories", nargs="*", help='official names, e.g. cat "alarm clock"')
    p.add_argument("--all", action="store_true", help="all 345 categories")
    p.add_argument("--max-per-class", type=int, help="first N drawings of each category (default: all)")
    p.add_argument("--root", default="data", help="local folder (default: data)")
    p.add_argument("--format", choices=("bitmap",) + KINDS, default="bitmap")
    p.add_argument("--base-url", help=f"mirror root or local folder (default: ${BASE_URL_ENV} or {DEFAULT_BASE_URL})")
    p.add_argument("--workers", type=int, default=4, help="categories fetched at once")
    p.add_argument("--retries", type=int, default=FetchSettings.retries)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.all == bool(args.categories):
        p.error("name the categories or pass --all (not both)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    fetch = download_bitmaps if args.format == "bitmap" else partial(download_strokes, kind=args.format)
    stats: dict[str, Fetched] = {}
    try:
        fetch(category_names() if args.all else args.categories, root=args.root, max_per_class=args.max_per_class,
              base_url=args.base_url, workers=args.workers, progress=not args.no_progress,
              settings=FetchSettings(retries=args.retries), stats=stats)
    except (ValueError, DownloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    width = max([len("category"), *map(len, stats)])
    print(f"{'category':<{width}}  {'rows':>9}  {'bytes moved':>13}  file")
    for name, got in stats.items():
        print(f"{name:<{width}}  {got.rows:>9,}  {got.bytes_moved:>13,}  {got.path}")
    print(f"{len(stats)} categories, {sum(g.rows for g in stats.values()):,} rows, "
          f"{sum(g.bytes_moved for g in stats.values()):,} bytes moved")
    return 0


if __name__ == "__main__":
    sys.exit(main())
