"""uvicorn set up for this service: the fastest event loop and HTTP parser installed (uvloop and
httptools, else asyncio and h11), and a connection that sends no request head, or sends it too
slowly, is closed after idle_timeout (with a 408 when part of a request had arrived).

uvicorn's own keep-alive timeout only runs between requests and stops at the first byte, so a
client could hold a connection open forever by sending nothing, or one byte a minute.
"""
from __future__ import annotations

import asyncio
from functools import partial

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.api import ServiceConfig

REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                   b"content-length: 50\r\n\r\n" + b'{"detail": "request head not received in time"}'.ljust(50))


class HeadTimeout:
    """A deadline for each request head, from the connection's start or the last answer (mixed into
    uvicorn's protocol classes)."""
    head_timeout: float

    def __init__(self, *args, head_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_timeout, self.head_timer = head_timeout, None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        self.head_timer = self.loop.call_later(self.head_timeout, self._expire)

    def _expire(self) -> None:
        waiting = self.cycle is None or self.cycle.response_complete  # no request head since the timer began
        if self.transport.is_closing() or not waiting:
            return  # a request is being read (the body has its own timeout) or answered
        if self.head_begun():  # part of a request arrived: say why it ends (RFC 9110, 408)
            self.transport.write(REQUEST_TIMEOUT)
        self.transport.close()

    def head_begun(self) -> bool:
        raise NotImplementedError


class H11HeadTimeout(HeadTimeout, H11Protocol):
    def head_begun(self) -> bool:
        return bool(self.conn.trailing_data[0])


PROTOCOLS: dict[str, type] = {"h11": H11HeadTimeout}

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is not installed: h11 only
    pass
else:
    class HttpToolsHeadTimeout(HeadTimeout, HttpToolsProtocol):
        begun = False  # a message began and its head is not complete yet

        def on_message_begin(self) -> None:
            self.begun = True
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self.begun = False
            super().on_headers_complete()

        def head_begun(self) -> bool:
            return self.begun

    PROTOCOLS["httptools"] = HttpToolsHeadTimeout


def uvicorn_config(app, host: str, port: int, config: ServiceConfig, http: str = "auto", **options) -> uvicorn.Config:
    """The uvicorn.Config serving app with the service's timeouts (python -m app and the tests).

    http: "h11", "httptools", or "auto" (httptools if installed). The event loop is uvicorn's
    "auto": uvloop if installed. app may be an import string with factory=True and workers=N: the
    protocol is a partial, which pickles into the worker processes."""
    options.setdefault("workers", 1)
    kind = ("httptools" if "httptools" in PROTOCOLS else "h11") if http == "auto" else http
    if kind not in PROTOCOLS:
        raise ValueError(f"HTTP parser {kind!r} is not installed (have: {', '.join(PROTOCOLS)})")
    return uvicorn.Config(app, host=host, port=port, http=partial(PROTOCOLS[kind], head_timeout=config.idle_timeout),
                          timeout_keep_alive=max(1, round(config.idle_timeout)), **options)
