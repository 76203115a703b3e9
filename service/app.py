"""The FastAPI app factory: state, lifespan (policies, cache, model load and warm-up in the background), routers,
and the edge middleware (request ids, API keys, in-flight limit, content type, body limits, access log, metrics).

The app answers /healthz as soon as it starts; /readyz and /classify answer 503 until the model is loaded and warmed
up (or with the reason it could not be loaded). ``uniguard serve`` loads the model before it starts listening, so a
missing, corrupt or incompatible model stops it (service/cli.py); only a missing *default* model starts not-ready.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import gc
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI

from policies.registry import PolicyError, PolicyRegistry
from service.batcher import DynamicBatcher
from service.cache import NullCache, ScoreCache, make_cache
from service.classifier import Classifier, ResolvedPolicy, resolve_registry
from service.config import PLAYGROUND_PATHS, PROBE_PATHS, Settings, load_settings
from service.engine import OnnxEngine
from service.errors import BodyError, ServiceError, error_response, install_error_handlers
from service.logs import new_request_id, request_id_var
from service.metrics import Metrics
from service.schemas import ReloadResult
from service.security import bearer_token, key_matches

log = logging.getLogger("uniguard.service")
access_log = logging.getLogger("uniguard.access")
EngineFactory = Callable[[Settings], OnnxEngine]
JSON_BODY_PATHS = frozenset({"/classify"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def default_engine_factory(settings: Settings) -> OnnxEngine:
    model_dir = settings.resolved_model_dir
    if not model_dir.is_dir():
        raise ServiceError(
            503,
            "model_missing",
            f"model folder {model_dir} does not exist: build the default model with `make model`, "
            "or point UNIGUARD_MODEL_DIR (uniguard serve --model) at an exported model folder",
        )
    return OnnxEngine(model_dir, provider=settings.provider, threads=settings.intra_op_threads)


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    engine_factory: EngineFactory
    registry: PolicyRegistry = field(default_factory=lambda: PolicyRegistry([]))
    resolved: dict[str, ResolvedPolicy] = field(default_factory=dict)
    cache: ScoreCache = field(default_factory=NullCache)
    engine: OnnxEngine | None = None
    batcher: DynamicBatcher | None = None
    classifier: Classifier | None = None
    ready: bool = False
    status: str = "starting: loading the model"
    load_error: str | None = None
    inflight: int = 0
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def set_registry(self, registry: PolicyRegistry) -> None:
        """Swap the registry and its resolved thresholds together (one assignment each, no await between)."""
        resolved = resolve_registry(registry, self.engine.manifest if self.engine else None)
        self.registry, self.resolved = registry, resolved

    async def reload_policies(self) -> ReloadResult:
        """Re-read the policy folders; an invalid file raises PolicyError and the current registry keeps serving."""
        async with self.reload_lock:
            try:
                registry = await asyncio.to_thread(PolicyRegistry.load, self.settings.policy_dirs)
            except (PolicyError, OSError) as exc:
                self.metrics.policy_reloads.labels("rejected").inc()
                log.error("policy reload rejected, the previous registry keeps serving: %s", exc)
                raise PolicyError(str(exc)) from exc
            old = {p.name: p.content_hash for p in self.registry}
            self.set_registry(registry)
            new = {p.name: p.content_hash for p in registry}
            self.metrics.policy_reloads.labels("ok").inc()
            result = ReloadResult(
                policies=registry.names,
                added=[n for n in new if n not in old],
                removed=[n for n in old if n not in new],
                changed=[n for n in new if n in old and old[n] != new[n]],
            )
            log.info(
                "policies reloaded: %d policies (%d added, %d removed, %d changed)",
                len(new),
                len(result.added),
                len(result.removed),
                len(result.changed),
            )
            return result

    async def load_model(self) -> None:
        """Load the engine off the event loop, warm it up, then mark the service ready."""
        s = self.settings
        try:
            engine = await asyncio.to_thread(self.engine_factory, s)
            self.engine = engine
            self.status = "starting: warming up"
            await asyncio.to_thread(engine.warmup, s.warmup_batches)
        except Exception as exc:  # report any load failure through /readyz instead of crashing
            message = exc.message if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {exc}"
            self.engine = None
            self.load_error = message
            self.status = f"model not loaded: {message}"
            log.error("model not loaded: %s", message)
            return
        self.batcher = DynamicBatcher(
            engine,
            self.metrics,
            max_batch_size=s.max_batch_size,
            max_batch_tokens=s.max_batch_tokens,
            max_wait_ms=s.max_wait_ms,
            max_queue=s.max_queue,
        )
        self.batcher.start()
        self.set_registry(self.registry)  # thresholds now come from the model's manifest
        self.classifier = Classifier(engine, self.batcher, self.cache, self.metrics, s)
        manifest = engine.manifest
        self.metrics.model_info.labels(engine.model_id, manifest.target, engine.provider).set(1)
        # Everything allocated so far (model, tokenizer, registry, app) lives as long as the process: move it out of
        # the collector's reach so that full collections, which would otherwise walk it, stay short (latency tail).
        gc.collect()
        gc.freeze()
        self.ready = True
        self.status = "ready"
        self.metrics.ready.set(1)
        log.info("model %s ready (%s, %s)", engine.model_id, manifest.target, engine.provider)


def create_app(
    settings: Settings | None = None,
    engine_factory: EngineFactory | None = None,
    *,
    registry: PolicyRegistry | None = None,
    handle_signals: bool = False,
) -> FastAPI:
    """Build the app. ``engine_factory`` lets tests substitute a slow or failing engine; ``registry`` an already
    validated registry; ``handle_signals`` installs the SIGHUP policy reload (``uniguard serve`` only)."""
    from uniguard import __version__

    settings = settings or load_settings()
    state = AppState(settings=settings, metrics=Metrics(), engine_factory=engine_factory or default_engine_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # an invalid policy file stops the start-up
        state.set_registry(registry if registry is not None else PolicyRegistry.load(settings.policy_dirs))
        state.cache = make_cache(
            settings.redis_url,
            settings.cache_ttl_seconds,
            settings.cache_max_entries,
            settings.cache_key_prefix,
            state.metrics,
            settings.redis_timeout_s,
            settings.redis_backoff_max_s,
        )
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task[None]] = set()
        if handle_signals:

            def _on_sighup() -> None:
                task = loop.create_task(_reload_on_signal(state), name="uniguard-sighup-reload")
                reloads.add(task)
                task.add_done_callback(reloads.discard)

            loop.add_signal_handler(signal.SIGHUP, _on_sighup)
        loader = asyncio.create_task(state.load_model(), name="uniguard-load-model")
        app.state.loader = loader
        try:
            yield
        finally:
            if handle_signals:
                loop.remove_signal_handler(signal.SIGHUP)
            state.ready = False
            state.metrics.ready.set(0)
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            if state.batcher is not None:
                await state.batcher.close(drain_timeout_s=settings.request_timeout_s)
            await state.cache.close()
            log.info("shut down")

    error = {"model": _error_model()}
    app = FastAPI(
        title="UniGuard",
        version=__version__,
        summary="Guardrail classification: is this prompt safe under these policies?",
        description='Errors always have the body `{"error": {"code", "message", "field"}}`. When API keys are '
        "configured, every endpoint except the public probes needs `Authorization: Bearer <key>`.",
        lifespan=lifespan,
        responses={
            400: {"description": "body is not valid JSON or not UTF-8", **error},
            401: {"description": "missing or wrong API key (when keys are configured)", **error},
            413: {"description": "body over UNIGUARD_MAX_BODY_BYTES", **error},
            415: {"description": "content type is not application/json", **error},
            422: {"description": "invalid request; error.field names the offending field", **error},
            429: {"description": "overloaded; retry after Retry-After seconds", **error},
            500: {"description": "internal error (a bug: please report it)", **error},
            503: {"description": "not ready, shutting down or the model failed", **error},
        },
    )
    app.state.uniguard = state
    install_error_handlers(app)
    app.add_middleware(_Edge, state=state)

    from service.routers import admin, classify, ops, playground, policies

    app.include_router(classify.router)
    app.include_router(policies.router)
    app.include_router(ops.router)
    app.include_router(admin.router)
    if settings.playground:
        app.include_router(playground.router)
    _describe_auth(app, settings)
    return app


async def _reload_on_signal(state: AppState) -> None:
    with contextlib.suppress(PolicyError):  # already logged; the old registry keeps serving
        await state.reload_policies()


def _describe_auth(app: FastAPI, settings: Settings) -> None:
    """With API keys configured, the OpenAPI schema declares the bearer scheme on every non-public operation."""
    if not settings.api_key_hashes:
        return
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
            )
            schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes["apiKey"] = {"type": "http", "scheme": "bearer", "description": "an API key"}
            for path, operations in schema.get("paths", {}).items():
                if path not in settings.public_paths:
                    for operation in operations.values():
                        operation["security"] = [{"apiKey": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _error_model() -> Any:
    from service.schemas import ErrorResponse

    return ErrorResponse


def _media_type(value: str) -> tuple[str, str | None]:
    """(``type/subtype`` lower-cased, charset or None) of a Content-Type header."""
    parts = [p.strip() for p in value.split(";")]
    charset = None
    for param in parts[1:]:
        key, _, val = param.partition("=")
        if key.strip().lower() == "charset":
            charset = val.strip().strip('"').lower()
    return parts[0].lower(), charset


class _Edge:
    """Pure ASGI middleware, in order: request id; API key (401); in-flight limit (429); content type (415);
    body size (413, also while the body streams in); UTF-8 (400, decoded incrementally as it streams in); then the
    access log line and the request metrics (by route template and status)."""

    def __init__(self, app: Any, state: AppState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request_id = new_request_id(headers.get("x-request-id"))
        token = request_id_var.set(request_id)
        status = {"code": 500}

        async def observed_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        counted = False
        try:
            rejection = self._reject(scope, headers)
            if rejection is not None:
                await rejection(scope, receive, observed_send)
                return
            path = scope.get("path", "")
            counted = path not in PROBE_PATHS
            if counted:
                self.state.inflight += 1
                self.state.metrics.inflight.set(self.state.inflight)
            await self.app(scope, self._limited(scope, receive), observed_send)
        finally:
            if counted:
                self.state.inflight -= 1
                self.state.metrics.inflight.set(self.state.inflight)
            self._observe(scope, status["code"], started, request_id)
            request_id_var.reset(token)

    def _reject(self, scope: dict[str, Any], headers: dict[str, str]) -> Any:
        """An error response to send instead of running the app, or None."""
        s = self.state.settings
        path, method = scope.get("path", ""), scope.get("method", "")
        public = path in s.public_paths or (s.playground and path in PLAYGROUND_PATHS)
        needs_key = bool(s.api_key_hashes) and not public
        if needs_key and not key_matches(bearer_token(headers.get("authorization")), s.api_key_hashes):
            self.state.metrics.auth_failures.inc()
            return error_response(
                401,
                "unauthorized",
                "a valid API key is required: send `Authorization: Bearer <key>`",
                headers={"WWW-Authenticate": 'Bearer realm="uniguard"'},
            )
        if path not in PROBE_PATHS and self.state.inflight >= s.max_inflight_requests:
            self.state.metrics.inflight_rejected.inc()
            return error_response(
                429,
                "overloaded",
                f"{self.state.inflight} requests in flight (UNIGUARD_MAX_INFLIGHT_REQUESTS); retry later",
                headers={"Retry-After": str(s.retry_after_s)},
            )
        if method in BODY_METHODS and path in JSON_BODY_PATHS:
            media_type, charset = _media_type(headers.get("content-type", ""))
            is_json = media_type == "application/json" or (
                media_type.startswith("application/") and media_type.endswith("+json")
            )
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

    def _limited(self, scope: dict[str, Any], receive: Any) -> Any:
        """``receive`` that stops a body over the limit as soon as it passes it, and rejects bytes that are not
        UTF-8 on JSON endpoints, while the body streams in (no body is ever buffered past the limit)."""
        limit = self.state.settings.max_body_bytes
        decoder = codecs.getincrementaldecoder("utf-8")() if scope.get("path") in JSON_BODY_PATHS else None
        seen = {"bytes": 0}

        async def limited_receive() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                seen["bytes"] += len(chunk)
                if seen["bytes"] > limit:
                    raise BodyError(
                        413, "payload_too_large", f"request body over {limit} bytes (UNIGUARD_MAX_BODY_BYTES)"
                    )
                if decoder is not None:
                    try:
                        decoder.decode(chunk, final=not message.get("more_body", False))
                    except UnicodeDecodeError as exc:
                        raise BodyError(
                            400, "invalid_utf8", f"request body is not valid UTF-8 (byte {exc.start} of a chunk)"
                        ) from None
            return message

        return limited_receive

    def _observe(self, scope: dict[str, Any], status: int, started: float, request_id: str) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        method = scope.get("method", "")
        elapsed = time.monotonic() - started
        labels = (endpoint, method, str(status))
        self.state.metrics.requests.labels(*labels).inc()
        self.state.metrics.request_seconds.labels(*labels).observe(elapsed)
        path = scope.get("path", "")
        access_log.log(
            logging.DEBUG if path in PROBE_PATHS and status < 400 else logging.INFO,
            "request",
            extra={
                "request_id": request_id,
                "method": method,
                "path": path[:200],
                "status": status,
                "latency_ms": round(elapsed * 1000, 3),
            },
        )
