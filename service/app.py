"""The FastAPI app factory: state, lifespan (policies, cache, model load and warm-up in the background), routers.

The app answers /healthz as soon as it starts; /readyz and /classify answer 503 until the model is loaded and warmed
up (or with the reason it could not be loaded, e.g. a missing model folder).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, HTTPException

from policies.registry import PolicyRegistry
from service.batcher import DynamicBatcher
from service.cache import NullCache, ScoreCache, make_cache
from service.classifier import Classifier
from service.config import Settings, load_settings
from service.engine import OnnxEngine
from service.errors import ServiceError, error_response, install_error_handlers
from service.metrics import Metrics

log = logging.getLogger("uniguard.service")
EngineFactory = Callable[[Settings], OnnxEngine]


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
    cache: ScoreCache = field(default_factory=NullCache)
    engine: OnnxEngine | None = None
    batcher: DynamicBatcher | None = None
    classifier: Classifier | None = None
    ready: bool = False
    status: str = "starting: loading the model"
    load_error: str | None = None

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
        self.classifier = Classifier(engine, self.batcher, self.cache, self.registry, self.metrics, s)
        manifest = engine.manifest
        self.metrics.model_info.labels(engine.model_id, manifest.target, engine.provider).set(1)
        self.ready = True
        self.status = "ready"
        self.metrics.ready.set(1)
        log.info("model %s ready (%s, %s)", engine.model_id, manifest.target, engine.provider)


def create_app(settings: Settings | None = None, engine_factory: EngineFactory | None = None) -> FastAPI:
    """Build the app; ``engine_factory`` lets tests substitute a slow or failing engine."""
    from uniguard import __version__

    settings = settings or load_settings()
    state = AppState(settings=settings, metrics=Metrics(), engine_factory=engine_factory or default_engine_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.registry = PolicyRegistry.load(settings.policy_dirs)  # an invalid policy file stops the start-up
        state.cache = make_cache(
            settings.redis_url,
            settings.cache_ttl_seconds,
            settings.cache_max_entries,
            settings.cache_key_prefix,
            state.metrics,
            settings.redis_timeout_s,
            settings.redis_backoff_max_s,
        )
        loader = asyncio.create_task(state.load_model(), name="uniguard-load-model")
        app.state.loader = loader
        try:
            yield
        finally:
            state.ready = False
            state.metrics.ready.set(0)
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            if state.batcher is not None:
                await state.batcher.close(drain_timeout_s=settings.request_timeout_s)
            await state.cache.close()

    app = FastAPI(
        title="UniGuard",
        version=__version__,
        summary="Guardrail classification: is this prompt safe under these policies?",
        lifespan=lifespan,
        responses={
            422: {"description": "invalid request", "model": _error_model()},
            503: {"description": "not ready or overloaded", "model": _error_model()},
        },
    )
    app.state.uniguard = state
    install_error_handlers(app)
    app.add_middleware(_Observe, state=state)

    from service.routers import classify, ops, policies

    app.include_router(classify.router)
    app.include_router(policies.router)
    app.include_router(ops.router)
    return app


def _error_model() -> Any:
    from service.schemas import ErrorResponse

    return ErrorResponse


class _Observe:
    """Pure ASGI middleware: request metrics by route template and status, and the body-size limit (413)."""

    def __init__(self, app: Any, state: AppState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.state.settings.max_body_bytes
        started = time.monotonic()
        status = {"code": 500}
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                response = error_response(
                    413, "payload_too_large", f"request body over {limit} bytes (UNIGUARD_MAX_BODY_BYTES)"
                )
                await response(scope, receive, send)
                self._observe(scope, 413, started)
                return
        seen = {"bytes": 0}

        async def limited_receive() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                seen["bytes"] += len(message.get("body", b""))
                if seen["bytes"] > limit:
                    raise HTTPException(413, f"request body over {limit} bytes (UNIGUARD_MAX_BODY_BYTES)")
            return message

        async def observed_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive, observed_send)
        finally:
            self._observe(scope, status["code"], started)

    def _observe(self, scope: dict[str, Any], status: int, started: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        labels = (endpoint, scope.get("method", ""), str(status))
        self.state.metrics.requests.labels(*labels).inc()
        self.state.metrics.request_seconds.labels(*labels).observe(time.monotonic() - started)
