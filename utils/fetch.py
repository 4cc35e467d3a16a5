"""Resumable, checked fetches of a remote file's first bytes: over HTTP(S) with Range requests, or from a
local folder. Nothing here knows a file format: the caller says how many bytes it needs (plan) and how
many cached bytes a resume re-reads (overlap).

The bytes grow in <file>.part; <file>.part.json names the remote file they came from (URL, size, ETag,
Last-Modified). A resume is conditional on a strong ETag (If-Range); without one, it re-reads the last
`overlap` bytes and compares them. Any answer from another file (a changed size or validator, different
bytes, or a whole file where a range was asked: the file changed or the server ignores ranges) discards
the partial bytes and starts again from byte 0; a 206 for any other range than the one asked, or an HTML
page, is an error. urllib3's Retry retries connecting and retryable statuses; a body cut short is resumed
from the bytes kept.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from utils.io import write_json

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


def file_size(path: Path) -> int:
    return path.stat().st_size


def read_tail(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(0, file_size(path) - n))
        return f.read()


def tag_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def read_json(path: Path) -> dict | None:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def origin(meta: dict | None) -> str:
    return (meta or {}).get("source") or "an unrecorded source"


def _discard(part: Path, reason: str) -> None:
    """Drop partial bytes that are not from the remote file now asked for (the cached file is replaced
    only once new rows are complete)."""
    log.warning("%s; discarding the cached bytes and fetching from the start", reason)
    for path in (tag_path(part), part):  # the voucher first: an interruption leaves nothing wrongly trusted
        path.unlink(missing_ok=True)


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
                        raise _Changed(f"the {len(expect)} bytes before offset {file_size(part)} are not the "
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
        return total if total is not None or end is not None else file_size(part)  # read to its end: its size


def fetch_prefix(source: str | Path, part: Path, plan: Callable[[int | None], tuple[int | None, int | None]],
                 overlap: Callable[[], int], settings: FetchSettings, meter: Callable[[int], None]) -> tuple[int, dict]:
    """Grow part, the first bytes of source (a URL or a path), until it holds what the caller needs.

    plan(remote size or None) says, from part's bytes so far: (bytes needed, or None while that is not
    known yet; where the next request should end, or None for the file's end); it raises CorruptFileError
    if they are not the file they should be. overlap() says how many of part's last bytes a resume without
    a strong ETag re-reads. meter(k) is told of every k bytes read. Returns (bytes needed, part's tag)."""
    tag = read_json(tag_path(part))
    if part.exists() and file_size(part) and origin(tag) != str(source):
        _discard(part, f"{part} holds bytes from {origin(tag)}, not from {source}")
    part.touch()

    def check(identity: dict) -> None:
        nonlocal tag
        if file_size(part):
            changed = [k for k, v in identity.items() if v is not None and tag.get(k) not in (None, v)]
            if changed:
                raise _Changed(", ".join(f"{k} was {tag[k]!r}, is now {identity[k]!r}" for k in changed))
            new = {**tag, **{k: v for k, v in identity.items() if v is not None}}
        else:
            new = {"source": str(source), **identity}
        if new != tag:  # on disk before the bytes it vouches for
            tag = new
            write_json(tag_path(part), tag)

    total = tag.get("remote_bytes") if tag and file_size(part) else None
    failures, changes = 0, 0
    with _session(settings) as session:
        while True:
            have = file_size(part)
            if total is not None and have > total:
                log.warning("%s is longer than %s (%d bytes); starting it again", part, source, total)
                part.write_bytes(b"")
                continue
            need, target = plan(total)
            if need is not None and have >= need:
                return need, tag
            if total is not None and have >= total:
                raise CorruptFileError(f"{source} ends at {total} bytes, {need} are needed")
            if total is not None and target is not None:
                target = min(target, total)
            # No strong validator to make the resume conditional on: re-read the last bytes and compare.
            expect = read_tail(part, overlap()) if have and not _strong_etag(tag) else b""
            if_range = (_strong_etag(tag) or tag.get("last_modified")) if have else None
            try:
                if isinstance(source, Path):
                    total = _read_local(source, have - len(expect), target, part, settings, meter, check, expect)
                else:
                    total = _read_http(source, have - len(expect), target, part, session, settings, meter, check,
                                       expect, if_range) or total
                if total is not None and tag.get("remote_bytes") is None:  # learnt by reading to the end
                    check(_identity(total))
                if file_size(part) == have and (total is None or have < total):
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
                failures = 0 if file_size(part) > have else failures + 1
                if failures > settings.retries:
                    raise DownloadError(f"{source}: giving up after {failures} failed attempts: {e}") from e
                delay = min(settings.backoff * 2 ** (failures - 1), settings.max_backoff) if failures else 0.0
                log.info("%s: %s; resuming in %.1f s", source, e, delay)
                time.sleep(delay)
