"""Running the app under uvicorn with deadlines for slow clients.

uvicorn bounds idle keep-alive connections (``timeout_keep_alive``) but neither the time a connection takes to send
its request line and headers nor their size; this protocol adds both: a connection that has not sent complete
headers within ``UNIGUARD_HEADER_TIMEOUT_S`` gets 408, one whose headers pass ``UNIGUARD_MAX_HEADER_BYTES`` gets
431, and either is closed. The body deadline is the ``BodyGuard`` middleware's
(``UNIGUARD_BODY_TIMEOUT_S``), and ``limit_concurrency`` (``UNIGUARD_MAX_CONNECTIONS``) bounds open connections.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.config import Settings


def raw_error(status: int, reason: str, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 error response with the service's JSON envelope, for answers sent before the app runs."""
    body = json.dumps({"error": {"code": code, "message": message, "field": None}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with two bounds on the part of a request before its body: the time from the
    connection (or the first byte of the next request on a keep-alive connection) to the end of the headers, and the
    bytes received meanwhile (request line and headers; one read of overshoot at most)."""

    header_timeout_s = 5.0
    max_header_bytes = 65536
    _header_timer: asyncio.TimerHandle | None = None
    _header_bytes = 0

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        reading_headers = self._header_timer is not None
        self._header_bytes += len(data)
        super().data_received(data)
        # still in the headers after this read: everything received so far is request line and headers
        if reading_headers and self._header_timer is not None and self._header_bytes > self.max_header_bytes:
            self._refuse(
                raw_error(
                    431,
                    "Request Header Fields Too Large",
                    "headers_too_large",
                    f"the request line and headers exceed {self.max_header_bytes} bytes (UNIGUARD_MAX_HEADER_BYTES)",
                )
            )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_bytes = 0
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        message = f"the request headers did not arrive within {self.header_timeout_s:g} s (UNIGUARD_HEADER_TIMEOUT_S)"
        self._refuse(raw_error(408, "Request Timeout", "request_timeout", message))

    def _refuse(self, response: bytes) -> None:
        self._disarm_header_timer()
        if not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()


def protocol_for(settings: Settings) -> type[HeaderDeadlineProtocol]:
    bounds = {"header_timeout_s": settings.header_timeout_s, "max_header_bytes": settings.max_header_bytes}
    return type("UniGuardHttpProtocol", (HeaderDeadlineProtocol,), bounds)


def run(app: Any, settings: Settings) -> None:
    """Serve ``app`` with one uvicorn worker and the slow-client bounds from ``settings``."""
    import uvicorn

    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        http=protocol_for(settings),
        log_level=settings.log_level,
        log_config=None,
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 1,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        limit_concurrency=settings.max_connections,
        access_log=False,
    )
