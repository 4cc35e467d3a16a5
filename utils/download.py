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
Cached bytes are reused only for the same URL and the same remote file. A resume is conditional on the
file's ETag (If-Range); where the server gives none, the request re-reads the last cached row or line
and compares it. Any other answer (a whole file where a range was asked, a changed size or validator,
different bytes) discards the partial bytes and fetches from byte 0. Every body is checked to be what it
claims to be (a .npy of uint8 rows agreeing with the file's size, lines of JSON drawings, not an HTML page).

    python -m utils.download cat "alarm clock" --max-per-class 5000 --root data/
"""
from __future__ import annotations

import argparse
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
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import requests
from filelock import FileLock, Timeout
from requests.adapters import HTTPAdapter
from tqdm.auto import tqdm
from urllib3.util.retry import Retry

from utils.categories import category_names, resolve_categories
from utils.io import atomic_write, write_json
from utils.npy import MAX_HEADER, NpyHeaderError, read_header

DEFAULT_BASE_URL = "https://storage.googleapis.com/quickdraw_dataset/"
BASE_URL_ENV = "QUICKDRAW_BASE_URL"
KINDS = ("simplified", "raw")
ROW_BYTES = 28 * 28
GUESSED_HEADER = 128  # numpy pads .npy headers to a multiple of 64 bytes (older versions: 16, giving 80)
IDENTITY = ("remote_bytes", "etag", "last_modified")  # recorded with cached bytes; any change discards them
MAX_CHANGES = 3  # a remote file replaced this often during one fetch is an error, not a thing to chase
RETRY_STATUS = (408, 429, 500, 502, 503, 504)  # the link or the server, not the request, is at fault

log = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """A file that could not be fetched; the message names the URL or path."""


class CorruptFileError(DownloadError):
    """A file (local or remote) whose content does not match what it claims to be."""


class _Dropped(Exception):
    """A body that ended early or brought nothing: resumed from the bytes kept."""


class _Changed(Exception):
    """The remote file is not the one the partial bytes came from: they are discarded."""


# A body cut short: our own resume after it (urllib3's Retry covers statuses and connecting).
_RESUMABLE = (_Dropped, requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


@dataclass(frozen=True)
class FetchSettings:
    retries: int = 5  # failed attempts in a row (with no byte gained) before giving up
    backoff: float = 0.5  # seconds between retries, doubled for each further one
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

def _size(path: Path) -> int:
    return path.stat().st_size


def _read_head(path: Path, n: int = MAX_HEADER) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _tail(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(0, _size(path) - n))
        return f.read()


def _npy_header(head: bytes, what):
    try:
        found = read_header(head, what, ROW_BYTES)
    except NpyHeaderError as e:
        raise CorruptFileError(str(e)) from None
    if found is not None and found.fortran_order:
        raise CorruptFileError(f"{what} is in Fortran order: its rows are not contiguous bytes")
    return found


def _count_lines(path: Path, stop: int | None = None) -> tuple[int, int | None]:
    """(lines seen, offset just past the stop-th newline or None)."""
    lines, offset = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
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
        return found.size

    @staticmethod
    def plan(part: Path, n: int | None, total: int | None, what) -> tuple[int | None, int | None]:
        """(bytes needed or None while the header is incomplete, end of the next request or None for all)."""
        found = _npy_header(_read_head(part), what)
        if found is None:
            if total is not None and _size(part) >= total:
                raise CorruptFileError(f"{what} ends inside its .npy header ({total} bytes)")
            # One request usually brings the header and the rows; a longer header costs a second one.
            return None, None if n is None else GUESSED_HEADER + n * ROW_BYTES
        whole = found.size + found.rows * ROW_BYTES
        if total is not None and total != whole:
            raise CorruptFileError(f"{what} ends at {total:,} bytes; its .npy header promises {whole:,} "
                                   f"({found.rows:,} rows of {ROW_BYTES})")
        need = found.size + ROW_BYTES * (found.rows if n is None else min(n, found.rows))
        return need, need

    @staticmethod
    def overlap(part: Path) -> int:
        return min(_size(part), ROW_BYTES)

    @staticmethod
    def write(part: Path, need: int, out, what) -> int:
        with open(part, "rb") as src:
            size = _npy_header(src.read(MAX_HEADER), what).size
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
        if found is None or _size(path) != found.size + found.rows * ROW_BYTES:
            raise CorruptFileError(f"{path} has {_size(path)} bytes; its .npy header "
                                   + (f"promises {found.size + found.rows * ROW_BYTES} ({found.rows} rows)"
                                      if found else "is incomplete"))
        return found.rows


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
    def overlap(part: Path) -> int:
        """The last line kept (or its start so far), at least 1 KiB of it where there is as much."""
        tail = _tail(part, 1 << 16)
        return max(len(tail) - tail.rfind(b"\n", 0, len(tail) - 1) - 1, min(len(tail), 1024))

    @staticmethod
    def write(part: Path, need: int, out, what) -> int:
        """Copy the first `need` bytes, each line checked to be a JSON object with a "drawing"."""
        rows = 0
        with open(part, "rb") as src:
            while src.tell() < need:
                line = src.readline(need - src.tell())
                rows += 1
                try:
                    drawing = json.loads(line)
                except ValueError:
                    drawing = None
                ok = isinstance(drawing, dict) and "drawing" in drawing
                if not ok:
                    kind = "an HTML page" if line.lstrip()[:1] == b"<" else "not a JSON drawing"
                    raise CorruptFileError(f"{what}: line {rows} is {kind} (it starts with {line[:40]!r})")
                out.write(line)
        return rows

    @staticmethod
    def rows(path: Path) -> int:
        lines, _ = _count_lines(path)
        return lines + (_size(path) > 0 and _tail(path, 1) != b"\n")  # a last line without its newline


BITMAP = _Bitmap()


# ---------------------------------------------------------------------------------------- byte moving

def _copy(src, dst, n: int) -> None:
    while n > 0:
        chunk = src.read(min(n, 1 << 20))
        if not chunk:
            raise CorruptFileError(f"{getattr(src, 'name', src)} ended {n} bytes early")
        dst.write(chunk)
        n -= len(chunk)


def _append(part: Path, chunks: Iterable[bytes], expect: bytes, limit: int | None,
            meter: Callable[[int], None]) -> None:
    """Append chunks to part after checking that they start with `expect` (not appended); at most `limit`."""
    written, head = 0, b""
    with open(part, "ab") as f:
        try:
            for chunk in chunks:
                meter(len(chunk))
                if len(head) < len(expect):
                    head, chunk = head + chunk[:len(expect) - len(head)], chunk[len(expect) - len(head):]
                    if not expect.startswith(head):
                        raise _Changed(f"the {len(expect)} bytes before offset {_size(part)} are not the "
                                       f"cached ones")
                if limit is not None:
                    chunk = chunk[:limit - written]
                f.write(chunk)
                written += len(chunk)
                if limit is not None and written >= limit:
                    break
        finally:  # what arrived before a dropped connection is kept: the next request resumes after it
            f.flush()
            os.fsync(f.fileno())


def _content_range(header: str | None, what) -> tuple[int | None, int | None, int | None]:
    m = re.fullmatch(r"bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)", (header or "").strip())
    if not m:
        raise DownloadError(f"{what}: unreadable Content-Range {header!r}")
    return tuple(None if g in (None, "*") else int(g) for g in m.groups())


def _identity(size: int | None, etag: str | None = None, last_modified: str | None = None) -> dict:
    """What tells one remote file from another at the same place: its size and validators, where known."""
    return dict(zip(IDENTITY, (size, etag, last_modified)))


def _strong_etag(tag: dict) -> str | None:
    etag = tag.get("etag")
    return etag if etag and not etag.startswith("W/") else None


def _session(settings: FetchSettings) -> requests.Session:
    """A session that retries connecting and answers with a retryable status, with growing waits."""
    retry = Retry(total=settings.retries, backoff_factor=settings.backoff, backoff_max=settings.max_backoff,
                  status_forcelist=RETRY_STATUS, allowed_methods=("GET",), raise_on_status=False)
    session = requests.Session()
    for scheme in ("http://", "https://"):
        session.mount(scheme, HTTPAdapter(max_retries=retry))
    return session


def _read_local(path: Path, start: int, end: int | None, part: Path, settings: FetchSettings,
                meter: Callable[[int], None], check: Callable[[dict], None], expect: bytes) -> int:
    """Append bytes [start + len(expect), end) of a local file to part; returns its size."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DownloadError(f"not found: {path}") from None
    with f:
        st = os.fstat(f.fileno())
        check(_identity(st.st_size, f'"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"'))
        stop = st.st_size if end is None else min(end, st.st_size)
        f.seek(start)
        _append(part, iter(lambda: f.read(max(0, min(settings.chunk_size, stop - f.tell()))), b""), expect,
                None, meter)
        return st.st_size


def _read_http(url: str, start: int, end: int | None, part: Path, session: requests.Session,
               settings: FetchSettings, meter: Callable[[int], None], check: Callable[[dict], None],
               expect: bytes, if_range: str | None) -> int | None:
    """Append bytes [start + len(expect), end) of url (end None: to its end) to part; its size if known.

    check(identity) sees the remote file's size and validators before any byte is appended; it raises to
    refuse. Only a 206 for exactly the range asked is appended; a whole file instead of a range means
    the file changed or the server ignores ranges (_Changed: start again from byte 0)."""
    # identity: a byte range of a compressed transfer would not be a byte range of the file
    headers = {"Accept-Encoding": "identity"}
    if start or end is not None:
        headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        if start and if_range:  # a changed file then comes whole (200) instead of as a range of the new bytes
            headers["If-Range"] = if_range
    try:
        r = session.get(url, headers=headers, stream=True, timeout=settings.timeout)
    except requests.RequestException as e:  # already retried by the session
        raise DownloadError(f"{url}: giving up after {settings.retries + 1} failed attempts: {e}") from e
    with r:
        validators = r.headers.get("ETag"), r.headers.get("Last-Modified")
        if r.status_code == 416:  # nothing at or after start: start is the size
            total = _content_range(r.headers.get("Content-Range"), url)[2]
            check(_identity(total, *validators))
            return total
        if r.status_code == 404:
            raise DownloadError(f"not found (HTTP 404): {url}")
        if r.status_code not in (200, 206):
            tries = len(r.raw.retries.history) + 1 if r.raw.retries else 1
            raise DownloadError(f"{url}: giving up after {tries} failed attempts: HTTP {r.status_code} {r.reason}"
                                if r.status_code in RETRY_STATUS else f"HTTP {r.status_code} {r.reason} for {url}")
        if r.status_code == 200 and start:
            raise _Changed(f"a range from byte {start} was asked"
                           f"{' if the file is still ' + if_range if if_range else ''}; a whole file came")
        if r.headers.get("Content-Type", "").startswith("text/html"):
            raise CorruptFileError(f"{url}: the server sent an HTML page (HTTP {r.status_code}), not the file")
        length = r.headers.get("Content-Length")
        if r.status_code == 200:
            total = int(length) if length else None
        else:
            first, last, total = _content_range(r.headers.get("Content-Range"), url)
            stop = total if end is None or total is None else min(end, total)
            if first != start or (stop is not None and last != stop - 1) or \
                    (length is not None and last is not None and int(length) != last - first + 1):
                raise DownloadError(f"{url}: asked for bytes {start}-{'' if stop is None else stop - 1}, was "
                                    f"sent {r.headers.get('Content-Range')} ({length} bytes)")
        check(_identity(total, *validators))
        _append(part, r.iter_content(settings.chunk_size), expect, None if end is None else end - start - len(expect),
                meter)
        return total if total is not None or end is not None else _size(part)  # read to its end: its size


def _fetch_prefix(fmt, source, part: Path, n: int | None, settings: FetchSettings,
                  meter: Callable[[int], None]) -> tuple[int, dict]:
    """Grow part (the remote file's first bytes) until it holds n rows; returns (bytes needed, part's tag).

    The tag beside part names the remote file its bytes came from; a response from any other file
    discards them and starts again from byte 0."""
    tag = _read_json(_tag(part))
    if part.exists() and _size(part) and _origin(tag) != str(source):
        _discard(part, f"{part} holds bytes from {_origin(tag)}, not from {source}")
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
    with _session(settings) as session:
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
            # No strong validator to make the resume conditional on: re-read the last row and compare.
            expect = _tail(part, fmt.overlap(part)) if have and not _strong_etag(tag) else b""
            if_range = (_strong_etag(tag) or tag.get("last_modified")) if have else None
            try:
                if isinstance(source, Path):
                    total = _read_local(source, have - len(expect), target, part, settings, meter, check, expect)
                else:
                    total = _read_http(source, have - len(expect), target, part, session, settings, meter, check,
                                       expect, if_range) or total
                if total is not None and tag.get("remote_bytes") is None:  # learnt by reading to the end
                    check(_identity(total))
                if _size(part) == have and (total is None or have < total):
                    raise _Dropped("the response brought no data")
                failures = 0
            except _Changed as e:
                changes += 1
                if changes > MAX_CHANGES:
                    raise DownloadError(f"{source} changed {changes} times while being fetched ({e})") from None
                _discard(part, f"{source} is not the remote file cached from it ({e})")
                tag, total = None, None
                part.touch()
            except _RESUMABLE as e:
                failures = 0 if _size(part) > have else failures + 1
                if failures > settings.retries:
                    raise DownloadError(f"{source}: giving up after {failures} failed attempts: {e}") from e
                delay = min(settings.backoff * 2 ** (failures - 1), settings.max_backoff) if failures else 0.0
                log.info("%s: %s; resuming in %.1f s", source, e, delay)
                time.sleep(delay)


# ---------------------------------------------------------------------------------------- cache

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


def _discard(part: Path, reason: str) -> None:
    """Drop partial bytes that are not from the remote file now asked for (the cached file is replaced
    only once new rows are complete)."""
    log.warning("%s; discarding the cached bytes and fetching from the start", reason)
    for path in (_tag(part), part):  # the voucher first: an interruption leaves nothing wrongly trusted
        path.unlink(missing_ok=True)


def _cached_rows(fmt, out: Path, meta: dict) -> int | None:
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
    meta, rows = _read_json(sidecar), None
    if out.exists() and _origin(meta) != str(source):
        log.warning("%s was fetched from %s, not from %s; discarding the cached bytes and fetching from the "
                    "start", out, _origin(meta), source)
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
        need, tag = _fetch_prefix(fmt, source, part, n, settings, count)
        total = tag.get("remote_bytes")
        with atomic_write(out) as f:  # the sidecar lands first: a file without a matching one is never trusted
            rows = fmt.write(part, need, f, source)
            meta = {"source": str(source), "rows": rows, "bytes": f.tell(),
                    "complete": total is not None and need >= total, **{k: tag.get(k) for k in IDENTITY},
                    "remote_head": _read_head(part)[:fmt.head_size(part)].hex()}
            f.flush()
            write_json(sidecar, meta)
    except CorruptFileError:
        for path in (_tag(part), part):  # whatever was wrong with these bytes, the next run starts afresh
            path.unlink(missing_ok=True)
        raise
    if fmt.rows(out) != rows or _size(out) != meta["bytes"]:
        raise CorruptFileError(f"{out} does not read back as the {rows} rows just written")
    _tag(part).unlink()
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
