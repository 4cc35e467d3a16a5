"""uvicorn set up for this service: a connection that sends no request head, or sends it too
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


class HeadTimeoutProtocol(H11Protocol):
    """H11Protocol with a deadline for each request head, from the connection's start or the last answer."""

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
        partial = bool(self.conn.trailing_data[0])
        if partial:  # part of a request arrived: say why it ends (RFC 9110, 408)
            self.transport.write(REQUEST_TIMEOUT)
        self.transport.close()


def uvicorn_config(app, host: str, port: int, config: ServiceConfig, **options) -> uvicorn.Config:
    """The uvicorn.Config serving app with the service's timeouts (python -m app and the tests).

    app may be an import string with factory=True and workers=N: the protocol is a partial, which
    pickles into the worker processes."""
    options.setdefault("workers", 1)
    return uvicorn.Config(app, host=host, port=port, http=partial(HeadTimeoutProtocol, head_timeout=config.idle_timeout),
                          timeout_keep_alive=max(1, round(config.idle_timeout)), **options)
