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
    numpy_bitmap/<name>.npy.lock   held while the file is being fetched (removed after)
    <kind>/<name>.ndjson (+ .json, .part, ...) likewise
Cached bytes are reused only for the same URL and the same remote file (size and validator); otherwise
they are discarded and the file is fetched from its start.

    python -m utils.download cat "alarm clock" --max-per-class 5000 --root data/
"""
from __future__ import annotations

import argparse
import difflib
import fcntl
import io
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import requests
from tqdm.auto import tqdm

from utils.io import atomic_write, write_json

DEFAULT_BASE_URL = "https://storage.googleapis.com/quickdraw_dataset/"
BASE_URL_ENV = "QUICKDRAW_BASE_URL"
CATEGORIES_FILE = Path(__file__).resolve().parents[1] / "data" / "categories.txt"
KINDS = ("simplified", "raw")
ROW_BYTES = 28 * 28
MAX_HEADER = 1 << 16  # a .npy header longer than this is not one numpy writes for a 2-d array
GUESSED_HEADER = 128  # numpy pads .npy headers to a multiple of 64 bytes (older versions: 16, giving 80)
IDENTITY = ("remote_bytes", "etag", "last_modified")  # recorded with cached bytes; any change discards them
MAX_CHANGES = 3  # a remote file replaced this often during one fetch is an error, not a thing to chase

log = logging.getLogger(__name__)


class UnknownCategoryError(ValueError):
    """Names that are not among the 345 official categories; .unknown maps each to its closest names."""

    def __init__(self, unknown: dict[str, list[str]]):
        self.unknown = unknown
        parts = [f"{name!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else "")
                 for name, close in unknown.items()]
        super().__init__(f"unknown Quick, Draw! categor{'y' if len(unknown) == 1 else 'ies'}: "
                         f"{', '.join(parts)}; the official names are listed in {CATEGORIES_FILE}")


class DownloadError(RuntimeError):
    """A file that could not be fetched; the message names the URL or path."""


class CorruptFileError(DownloadError):
    """A file (local or remote) whose content does not match what it claims to be."""


class _Transient(Exception):
    """A failure worth retrying (5xx, a response with no data)."""


class _Changed(Exception):
    """The remote file is not the one the partial bytes came from."""


# Retried with backoff: the link or the server, not the request, is at fault.
_TRANSIENT = (_Transient, requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


@dataclass(frozen=True)
class FetchSettings:
    retries: int = 5  # failed attempts in a row (with no byte gained) before giving up
    backoff: float = 0.5  # seconds before the first retry, doubled for each further one
    max_backoff: float = 30.0
    timeout: float = 30.0  # seconds to connect, and between two reads
    chunk_size: int = 1 << 16


@dataclass
class Fetched:
    """What the download of one category did."""
    path: Path
    rows: int
    bytes_moved: int  # bytes read from the source by this call (0: served from the cache)
    complete: bool  # the local file holds every row of the remote file


# ---------------------------------------------------------------------------------------- names, places

def category_names(path=CATEGORIES_FILE) -> list[str]:
    """The official category names, one a line in `path`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"category list not found: {path}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _normal(name: str) -> str:
    return " ".join(re.sub(r"[_\-]", " ", name).lower().split())


def resolve_categories(names: Iterable[str]) -> list[str]:
    """Official names in the order given, repeats dropped; any unknown name -> UnknownCategoryError."""
    if isinstance(names, str):
        names = [names]
    official = category_names()
    by_normal = {_normal(n): n for n in official}
    known, out, unknown = set(official), [], {}
    for name in names:
        if name in known:
            if name not in out:
                out.append(name)
            continue
        key = _normal(name)
        close = [by_normal[key]] if key in by_normal else []
        close += [by_normal[m] for m in difflib.get_close_matches(key, list(by_normal), n=3, cutoff=0.6)
                  if by_normal[m] not in close]
        unknown[name] = close[:3]
    if unknown:
        raise UnknownCategoryError(unknown)
    return out


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
# A format says how many bytes of the remote file N rows need and how to turn that prefix into the
# local file; fetching, caching and resuming are shared (_fetch_one).

def _npy_header(buf: bytes, what) -> tuple[int, int] | None:
    """(header bytes, rows) of a (rows, 784) uint8 .npy from its first bytes; None if buf is too short."""
    fmt = np.lib.format
    if len(buf) < fmt.MAGIC_LEN:
        return None
    if not buf.startswith(fmt.MAGIC_PREFIX):
        raise CorruptFileError(f"{what} is not a .npy file (it starts with {buf[:8]!r})")
    width = 2 if buf[6] == 1 else 4  # header length field: 2 bytes in format 1.0, 4 after
    if len(buf) < fmt.MAGIC_LEN + width:
        return None
    size = fmt.MAGIC_LEN + width + int.from_bytes(buf[fmt.MAGIC_LEN:fmt.MAGIC_LEN + width], "little")
    if size > MAX_HEADER:
        raise CorruptFileError(f"{what} declares a {size}-byte .npy header")
    if len(buf) < size:
        return None
    f = io.BytesIO(buf[:size])
    try:
        major, _ = fmt.read_magic(f)
        read = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
        shape, fortran, dtype = read(f, max_header_size=MAX_HEADER)
    except ValueError as e:
        raise CorruptFileError(f"{what} has a corrupt .npy header: {e}") from None
    if dtype != np.uint8 or fortran or len(shape) != 2 or shape[1] != ROW_BYTES:
        raise CorruptFileError(f"{what} holds {dtype} {shape} (fortran_order={fortran}); "
                               f"expected uint8 (rows, {ROW_BYTES})")
    return size, shape[0]


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(MAX_HEADER)


def _size(path: Path) -> int:
    return path.stat().st_size


def _count_lines(path: Path, stop: int | None = None, limit: int | None = None) -> tuple[int, int | None]:
    """(lines seen, offset just past the stop-th newline or None) within the first `limit` bytes."""
    lines, offset = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20 if limit is None else min(1 << 20, limit - offset)):
            found = chunk.count(b"\n")
            if stop is not None and lines + found >= stop:
                cut = -1
                for _ in range(stop - lines):
                    cut = chunk.index(b"\n", cut + 1)
                return stop, offset + cut + 1
            lines, offset = lines + found, offset + len(chunk)
    return lines, None


class _Bitmap:
    folder, suffix = "numpy_bitmap", ".npy"

    @staticmethod
    def local_path(root, name) -> Path:
        return bitmap_path(root, name)

    @staticmethod
    def head_size(path: Path) -> int:
        found = _npy_header(_read_head(path), path)
        if found is None:
            raise CorruptFileError(f"{path} ends inside its .npy header")
        return found[0]

    @staticmethod
    def plan(part: Path, n: int | None, total: int | None, what) -> tuple[int | None, int | None]:
        """(bytes needed or None while the header is incomplete, end of the next request or None for all)."""
        found = _npy_header(_read_head(part), what)
        if found is None:
            if total is not None and _size(part) >= total:
                raise CorruptFileError(f"{what} ends inside its .npy header ({total} bytes)")
            # One request usually brings the header and the rows; a longer header costs a second one.
            return None, None if n is None else GUESSED_HEADER + n * ROW_BYTES
        size, rows = found
        need = size + ROW_BYTES * (rows if n is None else min(n, rows))
        return need, need

    @staticmethod
    def write(part: Path, need: int, out, what) -> int:
        with open(part, "rb") as src:
            size, _ = _npy_header(src.read(MAX_HEADER), what)
            rows = (need - size) // ROW_BYTES
            np.lib.format.write_array_header_1_0(
                out, {"descr": "|u1", "fortran_order": False, "shape": (rows, ROW_BYTES)})
            src.seek(size)
            _copy(src, out, rows * ROW_BYTES)
        return rows

    @staticmethod
    def rows(path: Path) -> int:
        """Rows of a valid local file; CorruptFileError naming it otherwise."""
        found = _npy_header(_read_head(path), path)
        if found is None:
            raise CorruptFileError(f"{path} ends inside its .npy header")
        size, rows = found
        if _size(path) != size + rows * ROW_BYTES:
            raise CorruptFileError(f"{path} has {_size(path)} bytes; its header promises "
                                   f"{size + rows * ROW_BYTES} ({rows} rows)")
        return rows


@dataclass(frozen=True)
class _Strokes:
    folder: str  # "simplified" or "raw"
    suffix = ".ndjson"

    def local_path(self, root, name) -> Path:
        return strokes_path(root, name, self.folder)

    @staticmethod
    def head_size(path: Path) -> int:
        return 0

    @staticmethod
    def plan(part: Path, n: int | None, total: int | None, what) -> tuple[int | None, int | None]:
        have = _size(part)
        lines, end = _count_lines(part, n) if n is not None else (0, None)
        if end is not None:
            return end, end
        if total is not None and have >= total:
            return total, total  # fewer than n lines: all of them
        if n is None:
            return None, None
        # Lines vary in length: aim at n lines from the mean so far, 10% over, so one more request usually does.
        guess = int(have / lines * n * 1.1) if lines else max(2 * have, n * 1024)
        return None, max(guess, have + (1 << 14))

    @staticmethod
    def write(part: Path, need: int, out, what) -> int:
        with open(part, "rb") as src:
            _copy(src, out, need)
        return _Strokes.rows_of(part, need)

    @staticmethod
    def rows_of(path: Path, limit: int | None = None) -> int:
        lines, _ = _count_lines(path, limit=limit)
        size = _size(path) if limit is None else limit
        if size:  # a last line without its newline still counts
            with open(path, "rb") as f:
                f.seek(size - 1)
                lines += f.read(1) != b"\n"
        return lines

    def rows(self, path: Path) -> int:
        return self.rows_of(path)


BITMAP = _Bitmap()


# ---------------------------------------------------------------------------------------- byte moving

def _copy(src, dst, n: int) -> None:
    while n > 0:
        chunk = src.read(min(n, 1 << 20))
        if not chunk:
            raise CorruptFileError(f"{getattr(src, 'name', src)} ended {n} bytes early")
        dst.write(chunk)
        n -= len(chunk)


def _append(part: Path, chunks: Iterable[bytes], skip: int, limit: int | None,
            meter: Callable[[int], None]) -> int:
    """Append chunks to part, dropping the first `skip` bytes and stopping after `limit`; bytes written."""
    written = 0
    with open(part, "ab") as f:
        try:
            for chunk in chunks:
                meter(len(chunk))
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                if limit is not None:
                    chunk = chunk[:limit - written]
                f.write(chunk)
                written += len(chunk)
                if limit is not None and written >= limit:
                    break
        finally:  # what arrived before a dropped connection is kept: the next request resumes after it
            f.flush()
            os.fsync(f.fileno())
    return written


def _content_range(header: str | None, what) -> tuple[int, int, int | None]:
    m = re.fullmatch(r"bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)", (header or "").strip())
    if not m:
        raise DownloadError(f"{what}: unreadable Content-Range {header!r}")
    first, last, total = (None if g in (None, "*") else int(g) for g in m.groups())
    return first, last, total


def _identity(size: int | None, etag: str | None = None, last_modified: str | None = None) -> dict:
    """What tells one remote file from another at the same place: its size and validators, where known."""
    return dict(zip(IDENTITY, (size, etag, last_modified)))


def _if_range(tag: dict) -> str | None:
    """The validator to make a ranged request conditional on: a strong ETag, else Last-Modified."""
    etag = tag.get("etag")
    return etag if etag and not etag.startswith("W/") else tag.get("last_modified")


def _read_range(source: str | Path, start: int, end: int | None, part: Path, session: requests.Session,
                settings: FetchSettings, meter: Callable[[int], None], check: Callable[[dict], None],
                if_range: str | None = None) -> int | None:
    """Append bytes [start, end) of source (end None: to its end) to part; returns the source's size if known.

    check(identity) sees the remote file's size and validators before any byte is appended; it raises to refuse."""
    if isinstance(source, Path):
        try:
            f = open(source, "rb")
        except FileNotFoundError:
            raise DownloadError(f"not found: {source}") from None
        with f:
            st = os.fstat(f.fileno())
            size = st.st_size
            check(_identity(size, last_modified=datetime.fromtimestamp(st.st_mtime, timezone.utc).isoformat()))
            stop = size if end is None else min(end, size)
            f.seek(start)
            _append(part, iter(lambda: f.read(max(0, min(settings.chunk_size, stop - f.tell()))), b""), 0,
                    None, meter)
            return size
    # identity: a byte range of a compressed transfer would not be a byte range of the file
    headers = {"Accept-Encoding": "identity"}
    if start or end is not None:
        headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        if start and if_range:  # a changed file then comes whole (200) instead of as a range of the new bytes
            headers["If-Range"] = if_range
    with session.get(source, headers=headers, stream=True, timeout=settings.timeout) as r:
        validators = r.headers.get("ETag"), r.headers.get("Last-Modified")
        if r.status_code == 416:  # nothing at or after start: start is the size
            total = _content_range(r.headers.get("Content-Range"), source)[2]
            check(_identity(total, *validators))
            return total
        if r.status_code in (408, 429) or r.status_code >= 500:
            raise _Transient(f"HTTP {r.status_code} {r.reason}")
        if r.status_code == 404:
            raise DownloadError(f"not found (HTTP 404): {source}")
        if r.status_code not in (200, 206):
            raise DownloadError(f"HTTP {r.status_code} {r.reason} for {source}")
        if r.status_code == 206:
            first, _, total = _content_range(r.headers.get("Content-Range"), source)
            if first != start:
                raise DownloadError(f"{source}: asked for bytes from {start}, was sent bytes from {first}")
            skip = 0
        else:  # Range ignored: the whole file comes; drop what part already holds, stop once we have enough
            length = r.headers.get("Content-Length")
            total, skip = (int(length) if length else None), start
        check(_identity(total, *validators))
        written = _append(part, r.iter_content(settings.chunk_size), skip,
                          None if end is None else end - start, meter)
        if total is None and end is None:  # read to the end without error: now the size is known
            total = start + written
        return total


def _fetch_prefix(fmt, source, out: Path, part: Path, n: int | None, settings: FetchSettings,
                  meter: Callable[[int], None]) -> tuple[int, dict]:
    """Grow part (the remote file's first bytes) until it holds n rows; returns (bytes needed, part's tag).

    The tag beside part names the remote file its bytes came from; a response from any other file
    discards them (and the cached rows) and starts again from byte 0."""
    tag = _read_json(_tag(part))
    if part.exists() and _size(part) and _origin(tag) != str(source):
        _start_over(out, part, f"{part} holds bytes from {_origin(tag)}, not from {source}")
    part.touch()

    def check(identity: dict) -> None:
        nonlocal tag
        if _size(part):
            changed = [k for k, v in identity.items() if v is not None and tag.get(k) not in (None, v)]
            if changed:
                raise _Changed(", ".join(f"{k} was {tag[k]!r}, is now {identity[k]!r}" for k in changed))
            new = {**tag, **{k: v for k, v in identity.items() if v is not None}}
        else:
            new = {"source": str(source), **identity}
        if new != tag:  # on disk before the bytes it vouches for
            tag = new
            write_json(_tag(part), tag)

    total = tag.get("remote_bytes") if tag and _size(part) else None
    failures, changes = 0, 0
    with requests.Session() as session:
        while True:
            have = _size(part)
            if total is not None and have > total:
                log.warning("%s is longer than %s (%d bytes); starting it again", part, source, total)
                part.write_bytes(b"")
                continue
            need, target = fmt.plan(part, n, total, source)
            if need is not None and have >= need:
                return need, tag
            if total is not None and have >= total:
                raise CorruptFileError(f"{source} ends at {total} bytes, {need} are needed")
            if total is not None and target is not None:
                target = min(target, total)
            try:
                total = _read_range(source, have, target, part, session, settings, meter, check,
                                    _if_range(tag) if have else None) or total
                if total is not None and tag.get("remote_bytes") is None:  # learnt by reading to the end
                    check(_identity(total))
                if _size(part) == have and (total is None or have < total):
                    raise _Transient("the response brought no data")
                failures = 0
            except _Changed as e:
                changes += 1
                if changes > MAX_CHANGES:
                    raise DownloadError(f"{source} changed {changes} times while being fetched ({e})") from None
                _start_over(out, part, f"{source} is not the remote file cached from it ({e})")
                tag, total = None, None
                part.touch()
            except _TRANSIENT as e:
                failures = 0 if _size(part) > have else failures + 1
                if failures > settings.retries:
                    raise DownloadError(f"{source}: giving up after {failures} failed attempts: {e}") from e
                delay = min(settings.backoff * 2 ** (failures - 1), settings.max_backoff) if failures else 0.0
                log.info("%s: %s; retrying in %.1f s", source, e, delay)
                time.sleep(delay)


def _sidecar(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def _tag(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _read_json(path: Path) -> dict | None:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _origin(meta: dict | None) -> str:
    return (meta or {}).get("source") or "an unrecorded source"


def _start_over(out: Path, part: Path, reason: str) -> None:
    """Drop a file's cached rows and partial bytes: they are not from the remote file now asked for."""
    log.warning("%s; discarding the cached bytes and fetching from the start", reason)
    # Each voucher goes before what it vouches for, so an interruption leaves nothing wrongly trusted.
    for path in (_tag(part), part, out, _sidecar(out)):
        path.unlink(missing_ok=True)


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold <out>.lock exclusively: one fetch of a file at a time, across threads and processes."""
    path = out.with_name(out.name + ".lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s is being fetched by another download; waiting for it", out)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # the holder before us removes the file: a lock on the removed one guards nothing
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held (see above)
        os.close(fd)


def _cached_rows(fmt, out: Path, meta: dict | None) -> int | None:
    """Rows of a valid cached file, or None (a corrupt one is deleted so nothing loads it)."""
    if not out.exists():
        return None
    try:
        rows = fmt.rows(out)
        if (meta.get("bytes"), meta.get("rows")) != (_size(out), rows):
            raise CorruptFileError(f"{out} has {_size(out)} bytes and {rows} rows; {_sidecar(out)} "
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
    if part.exists() and _read_json(_tag(part)) == tag and _size(part) >= len(head) + _size(out) - offset:
        return  # an interrupted download of the same remote file went further: resume that
    _tag(part).unlink(missing_ok=True)
    with atomic_write(part) as f, open(out, "rb") as src:
        f.write(head)
        src.seek(offset)
        shutil.copyfileobj(src, f)
    write_json(_tag(part), tag)


def _fetch_one(fmt, name: str, root, n: int | None, base: str, settings: FetchSettings,
               meter: Callable[[int], None]) -> Fetched:
    out = fmt.local_path(root, name)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        got = _fetch_locked(fmt, out, n, _source(base, fmt.folder, name + fmt.suffix), settings, meter)
    if n is not None and got.rows < n:
        log.warning("%s: %d rows available, %d asked (the source file holds no more)", name, got.rows, n)
    return got


def _fetch_locked(fmt, out: Path, n: int | None, source, settings: FetchSettings,
                  meter: Callable[[int], None]) -> Fetched:
    part, sidecar = out.with_name(out.name + ".part"), _sidecar(out)
    meta = _read_json(sidecar)
    if out.exists() and _origin(meta) != str(source):
        _start_over(out, part, f"{out} was fetched from {_origin(meta)}, not from {source}")
        meta = None
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
        need, tag = _fetch_prefix(fmt, source, out, part, n, settings, count)
    except CorruptFileError:
        for path in (_tag(part), part):  # whatever was wrong with these bytes, the next run starts afresh
            path.unlink(missing_ok=True)
        raise
    total = tag.get("remote_bytes")
    complete = total is not None and need >= total
    with atomic_write(out) as f:  # the sidecar lands first: a file without a matching one is never trusted
        rows = fmt.write(part, need, f, source)
        meta = {"source": str(source), "rows": rows, "bytes": f.tell(), "complete": complete,
                **{k: tag.get(k) for k in IDENTITY}, "remote_head": _read_head(part)[:fmt.head_size(part)].hex()}
        f.flush()
        write_json(sidecar, meta)
    if fmt.rows(out) != rows or _size(out) != meta["bytes"]:
        raise CorruptFileError(f"{out} does not read back as the {rows} rows just written")
    _tag(part).unlink()
    part.unlink()
    return Fetched(out, rows, moved, complete)


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
