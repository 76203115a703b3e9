"""The edge of the service: three small pure-ASGI middlewares, outermost first.

- ``RequestContext``: request id (``X-Request-ID``), then the access log line and the request metrics (by route
  template and status) when the request ends.
- ``ApiKeyAuth``: API keys (401) and the admin gate (``/admin/*`` is off unless an admin key is configured or
  ``UNIGUARD_ADMIN_ENABLED`` is set).
- ``BodyGuard``: content type (415), declared size (413), then while the body streams in: size (413), UTF-8 (400)
  and the body deadline (408, connection closed); a request counts as in flight (and may get 429 for the in-flight
  limit) only once its body is read, so clients that stall their body hold no in-flight slot.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from service.config import PLAYGROUND_PATHS, PROBE_PATHS, Settings
from service.errors import BodyError, error_response
from service.logs import new_request_id, request_id_var
from service.metrics import Metrics
from service.security import bearer_token, key_matches
from service.state import AppState

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("uniguard.access")
JSON_BODY_PATHS = frozenset({"/classify"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
ADMIN_PREFIX = "/admin/"
DOCS_ASSETS = "/docs-assets/"
LOGGED_PATH_CHARS = 200


def header_map(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def media_type(value: str) -> tuple[str, str | None]:
    """(``type/subtype`` lower-cased, charset or None) of a Content-Type header."""
    parts = [p.strip() for p in value.split(";")]
    charset = None
    for param in parts[1:]:
        key, _, val = param.partition("=")
        if key.strip().lower() == "charset":
            charset = val.strip().strip('"').lower()
    return parts[0].lower(), charset


def is_public(path: str, settings: Settings) -> bool:
    """Open without an API key: the configured public paths (the docs assets go with /docs) and, when it is on, the
    playground's page and files."""
    if settings.playground and path in PLAYGROUND_PATHS:  # the page holds no data; its API calls send the key
        return True
    public = set(settings.public_paths)
    return path in public or ("/docs" in public and (path.startswith(DOCS_ASSETS) or path == "/redoc"))


class RequestContext:
    """Request id, access log line (path cut to 200 characters) and request metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        request_id = new_request_id(header_map(scope).get("x-request-id"))
        token = request_id_var.set(request_id)
        status = 500

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            self._observe(scope, status, started, request_id)
            request_id_var.reset(token)

    def _observe(self, scope: Scope, status: int, started: float, request_id: str) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        method = scope.get("method", "")
        elapsed = time.monotonic() - started
        labels = (endpoint, method, str(status))
        self.metrics.requests.labels(*labels).inc()
        self.metrics.request_seconds.labels(*labels).observe(elapsed)
        path = scope.get("path", "")
        shown = path if len(path) <= LOGGED_PATH_CHARS else f"{path[:LOGGED_PATH_CHARS]}...({len(path)} chars)"
        access_log.log(
            logging.DEBUG if path in PROBE_PATHS and status < 400 else logging.INFO,
            "request",
            extra={
                "request_id": request_id,
                "method": method,
                "path": shown,
                "status": status,
                "latency_ms": round(elapsed * 1000, 3),
            },
        )


class _Gate:
    """A middleware that may answer an HTTP request itself (``_reject``) before passing it on (``_pass``)."""

    app: ASGIApp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rejection = self._reject(scope)
        if rejection is not None:
            await rejection(scope, receive, send)
            return
        await self._pass(scope, receive, send)

    def _reject(self, scope: Scope) -> Any:
        return None

    async def _pass(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class ApiKeyAuth(_Gate):
    """401 without a valid API key (when keys are configured) outside the public paths; the admin gate."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics

    def _reject(self, scope: Scope) -> Any:
        s = self.settings
        path = scope.get("path", "")
        token = bearer_token(header_map(scope).get("authorization"))
        if path.startswith(ADMIN_PREFIX):
            if s.admin_key_hashes:
                return None if key_matches(token, s.admin_key_hashes) else self._unauthorized("an admin key")
            if not s.admin_enabled:
                return error_response(
                    404,
                    "admin_disabled",
                    "the admin endpoints are disabled: set UNIGUARD_ADMIN_KEY_HASHES (or UNIGUARD_ADMIN_ENABLED=true "
                    "on a private network) to enable them; SIGHUP reloads the policies too",
                )
        if s.api_key_hashes and not is_public(path, s) and not key_matches(token, s.api_key_hashes):
            return self._unauthorized("a valid API key")
        return None

    def _unauthorized(self, what: str) -> Any:
        self.metrics.auth_failures.inc()
        return error_response(
            401,
            "unauthorized",
            f"{what} is required: send `Authorization: Bearer <key>`",
            headers={"WWW-Authenticate": 'Bearer realm="uniguard"'},
        )


class BodyGuard(_Gate):
    """Content type, body size, UTF-8 and the body deadline; the in-flight count and limit once the body is read."""

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app, self.state = app, state

    async def _pass(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        counts = path not in PROBE_PATHS
        slot = {"held": False}

        def take_slot() -> None:
            s, state = self.state.settings, self.state
            if state.inflight >= s.max_inflight_requests:
                state.metrics.inflight_rejected.inc()
                state.guard.admission.refused_for_capacity()
                raise BodyError(
                    429,
                    "overloaded",
                    f"{state.inflight} requests in flight (UNIGUARD_MAX_INFLIGHT_REQUESTS); retry later",
                    headers={"Retry-After": str(s.retry_after_s)},
                )
            state.inflight += 1
            slot["held"] = True
            state.metrics.inflight.set(state.inflight)

        try:
            if counts and scope.get("method") not in BODY_METHODS:
                try:
                    take_slot()
                except BodyError as exc:
                    await error_response(exc.status_code, exc.code, str(exc.detail), headers=dict(exc.headers or {}))(
                        scope, receive, send
                    )
                    return
            await self.app(scope, self._guarded(scope, receive, take_slot if counts else None), send)
        finally:
            if slot["held"]:
                self.state.inflight -= 1
                self.state.metrics.inflight.set(self.state.inflight)

    def _reject(self, scope: Scope) -> Any:
        s = self.state.settings
        path, method = scope.get("path", ""), scope.get("method", "")
        headers = header_map(scope)
        if method in BODY_METHODS and path in JSON_BODY_PATHS:
            kind, charset = media_type(headers.get("content-type", ""))
            is_json = kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))
            if not is_json or charset not in (None, "utf-8", "utf8"):
                shown = headers.get("content-type") or "none"
                return error_response(
                    415,
                    "unsupported_media_type",
                    f"content type {shown[:100]!r} is not supported: send UTF-8 JSON with "
                    "`Content-Type: application/json`",
                    field="content-type",
                )
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > s.max_body_bytes:
            return error_response(
                413, "payload_too_large", f"request body over {s.max_body_bytes} bytes (UNIGUARD_MAX_BODY_BYTES)"
            )
        return None

    def _guarded(self, scope: Scope, receive: Receive, on_body_read: Callable[[], None] | None) -> Receive:
        """``receive`` that enforces the body deadline, stops a body over the limit as soon as it passes it,
        rejects bytes that are not UTF-8 on JSON endpoints (no body is ever buffered past the limit), and calls
        ``on_body_read`` once the last chunk is in."""
        s = self.state.settings
        limit, deadline = s.max_body_bytes, time.monotonic() + s.body_timeout_s
        decoder = codecs.getincrementaldecoder("utf-8")() if scope.get("path") in JSON_BODY_PATHS else None
        seen = {"bytes": 0, "done": scope.get("method") not in BODY_METHODS}
        metrics = self.state.metrics

        async def guarded_receive() -> Message:
            if seen["done"]:
                return await receive()
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                    message = await receive()
            except TimeoutError:
                metrics.client_timeouts.inc()
                raise BodyError(
                    408,
                    "request_timeout",
                    f"the request body did not arrive within {s.body_timeout_s:g} s (UNIGUARD_BODY_TIMEOUT_S)",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] != "http.request":
                return message
            chunk = message.get("body", b"")
            seen["bytes"] += len(chunk)
            if seen["bytes"] > limit:
                raise BodyError(413, "payload_too_large", f"request body over {limit} bytes (UNIGUARD_MAX_BODY_BYTES)")
            last = not message.get("more_body", False)
            if decoder is not None:
                try:
                    decoder.decode(chunk, final=last)
                except UnicodeDecodeError as exc:
                    raise BodyError(
                        400, "invalid_utf8", f"request body is not valid UTF-8 (byte {exc.start} of a chunk)"
                    ) from None
            if last:
                seen["done"] = True
                if on_body_read is not None:
                    on_body_read()
            return message

        return guarded_receive
