"""A local HTTP mirror for tests and benchmarks: serves a folder on 127.0.0.1 with Range (and If-Range)
support and ETag/Last-Modified validators, counts the bytes it sends, logs requests, and misbehaves on
demand (see Faults).

    with serve(SHARED_DIR) as mirror:
        download_bitmaps(["cat"], base_url=mirror.url, max_per_class=700)
        mirror.sent("cat.npy")  # body bytes sent for that file
"""
from __future__ import annotations

import email.utils
import io
import re
import socket
import sys
import threading
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import numpy as np

from utils.npy import read_file_header

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared" / "quickdraw"
ROW_BYTES = 28 * 28


@dataclass
class Faults:
    """Misbehaviour on demand.

    script: what the next GET requests meet, one item each, in order: an HTTP status to answer with
    (404, 500, ...) or "drop" (the body stops after drop_after bytes and the connection closes);
    requests after the script are served normally. Faults(script=[500, 500]): twice 500, then 200.
    """
    script: list = field(default_factory=list)
    drop_after: int = 1024
    ignore_range: bool = False  # always 200 with the whole file, as some servers do
    delay: float = 0.0  # seconds slept before each chunk of a body: a slow link
    validators: bool = True  # send ETag and Last-Modified (and honour If-Range); off, as some servers are
    chunk: int = 1 << 16
    # A 200 HTML error page without validators, as some proxies send: "if-range" to requests carrying
    # If-Range (resumes), "always" to every GET.
    html: str | None = None
    # Serve every file as a new version of the same size (a .npy's rows, or lines, in reverse order),
    # with its own validators where validators are sent: a file replaced between two runs.
    new_version: bool = False
    misrange: bool = False  # answer a range with the one starting a byte later (and its true Content-Range)


@dataclass
class Request:
    method: str
    path: str  # unquoted, relative to the served folder
    range: str | None
    if_range: str | None = None
    status: int = 0
    sent: int = 0  # body bytes


class MirrorServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, directory, faults: Faults | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.directory = Path(directory).resolve()
        self.faults = faults or Faults()
        self.lock = threading.Lock()
        self.requests: list[Request] = []
        self.bytes_sent = 0
        self._versions: dict[Path, bytes] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def sent(self, name: str = "") -> int:
        """Body bytes sent for the files whose path ends with name (all files if empty)."""
        with self.lock:
            return sum(r.sent for r in self.requests if r.path.endswith(name))

    def next_fault(self) -> int | str | None:
        with self.lock:
            return self.faults.script.pop(0) if self.faults.script else None

    def handle_error(self, request, client_address) -> None:
        """A client hanging up between requests (it closed a response it did not need) is not an error."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def new_version(self, path: Path) -> bytes:
        """The same-size new version of a file that Faults.new_version serves."""
        with self.lock:
            if path not in self._versions:
                self._versions[path] = reverse_rows(path)
            return self._versions[path]

    def count(self, record: Request, n: int) -> None:
        with self.lock:
            record.sent += n
            self.bytes_sent += n


class _Unsatisfiable(Exception):
    pass


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """[start, end) of a single "bytes=" range; None for forms not served (the whole file is sent)."""
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if not m or m.groups() == ("", ""):
        return None
    first, last = m.groups()
    if first == "":  # suffix: the last N bytes
        start, end = max(0, size - int(last)), size
    else:
        start, end = int(first), size if last == "" else min(int(last) + 1, size)
    if start >= end:
        raise _Unsatisfiable
    return start, end


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
    server: MirrorServer

    def log_message(self, format, *args) -> None:  # the request log is server.requests
        pass

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, body: bool) -> None:
        srv, faults = self.server, self.server.faults
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        path = (srv.directory / rel).resolve()
        record = Request(self.command, rel, self.headers.get("Range"), self.headers.get("If-Range"))
        with srv.lock:  # in the order the requests arrive
            srv.requests.append(record)
        fault = srv.next_fault() if body else None
        if isinstance(fault, int):
            return self._empty(record, fault)
        if not path.is_relative_to(srv.directory) or not path.is_file():
            return self._empty(record, 404)
        if body and (faults.html == "always" or (faults.html == "if-range" and record.if_range)):
            return self._page(record)
        stat = path.stat()
        data = srv.new_version(path) if faults.new_version else None
        size, version = stat.st_size, int(faults.new_version)
        # Both change when the file is replaced; the ETag also within the second Last-Modified names.
        validators = {"ETag": f'"{stat.st_mtime_ns:x}-{size:x}-{version}"',
                      "Last-Modified": email.utils.formatdate(stat.st_mtime + version, usegmt=True)}
        if not faults.validators:
            validators = {}
        start, end, record.status = 0, size, 200
        # If-Range naming another version of the file: the whole (new) file, not a range of it
        current = record.if_range is None or record.if_range in validators.values()
        if record.range and not faults.ignore_range and current:
            try:
                span = _parse_range(record.range, size)
            except _Unsatisfiable:
                return self._empty(record, 416, {"Content-Range": f"bytes */{size}"})
            if span:
                (start, end), record.status = span, 206
                start = min(start + int(faults.misrange), end - 1)
        self.send_response(record.status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start))
        for key, value in validators.items():
            self.send_header(key, value)
        if record.status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if body:
            with (open(path, "rb") if data is None else io.BytesIO(data)) as f:
                self._send_body(f, start, end, record, cut=faults.drop_after if fault == "drop" else None)

    def _empty(self, record: Request, status: int, headers: dict | None = None) -> None:
        record.status = status
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _page(self, record: Request) -> None:
        """HTML_PAGE with 200, no validators and no length: its body ends when the connection closes."""
        record.status, self.close_connection = 200, True
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(HTML_PAGE)
        self.server.count(record, len(HTML_PAGE))

    def _send_body(self, f, start: int, end: int, record: Request, cut: int | None) -> None:
        srv, faults = self.server, self.server.faults
        f.seek(start)
        while start < end:
            step = min(faults.chunk, end - start) if cut is None else min(faults.chunk, end - start,
                                                                           cut - record.sent)
            if faults.delay:
                time.sleep(faults.delay)
            data = f.read(step)
            try:
                self.wfile.write(data)
            except OSError:  # the client hung up (it had what it wanted, or it was killed)
                self.close_connection = True
                return
            srv.count(record, len(data))
            start += len(data)
            if cut is not None and record.sent >= cut:
                self.close_connection = True
                try:  # the client sees its body end early
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return


def header_size(path: Path) -> int:
    """Bytes of a bitmap .npy file's header (mirror files' headers vary in length)."""
    return read_file_header(path, ROW_BYTES).size


# An error page as proxies send them, inline styles and scripts making it longer than a resume offset.
HTML_PAGE = (b"<!DOCTYPE html>\n<html><head><title>503 Service Unavailable</title>\n<style>\n"
             + b"body { font-family: sans-serif; margin: 2em; }\n" * 4096
             + b"</style></head>\n<body><h1>Service Unavailable</h1><p>Please try again later.</p></body></html>\n")


def reverse_rows(path: Path) -> bytes:
    """A file's bytes with its rows (.npy) or lines (other files) in reverse order: same size, same format."""
    data = path.read_bytes()
    if path.suffix == ".npy":
        head = header_size(path)
        return data[:head] + np.frombuffer(data, np.uint8, offset=head).reshape(-1, ROW_BYTES)[::-1].tobytes()
    end = b"\n" if data.endswith(b"\n") else b""
    return b"\n".join(data[:len(data) - len(end)].split(b"\n")[::-1]) + end


@contextmanager
def serve(directory, faults: Faults | None = None) -> Iterator[MirrorServer]:
    """A MirrorServer on a free port of 127.0.0.1 serving directory, for the duration of the block."""
    server = MirrorServer(directory, faults)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
