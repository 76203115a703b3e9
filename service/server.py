"""Running the app under uvicorn with deadlines for slow clients.

uvicorn bounds idle keep-alive connections (``timeout_keep_alive``) but not a connection that is slow to send its
request line and headers; this protocol adds that deadline (``UNIGUARD_HEADER_TIMEOUT_S``): a connection that has
not sent complete headers in time gets 408 and is closed. The body deadline is the ``BodyGuard`` middleware's
(``UNIGUARD_BODY_TIMEOUT_S``), and ``limit_concurrency`` (``UNIGUARD_MAX_CONNECTIONS``) bounds open connections.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.config import Settings


def _timeout_response(seconds: float) -> bytes:
    body = json.dumps(
        {
            "error": {
                "code": "request_timeout",
                "message": f"the request headers did not arrive within {seconds:g} s (UNIGUARD_HEADER_TIMEOUT_S)",
                "field": None,
            }
        }
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline from the connection (or the first byte of the next request on a
    keep-alive connection) to the end of the request headers."""

    header_timeout_s = 5.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

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
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.write(_timeout_response(self.header_timeout_s))
            self.transport.close()


def protocol_for(settings: Settings) -> type[HeaderDeadlineProtocol]:
    return type("UniGuardHttpProtocol", (HeaderDeadlineProtocol,), {"header_timeout_s": settings.header_timeout_s})


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
