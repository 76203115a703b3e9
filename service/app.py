"""The FastAPI app factory: the lifespan (policies, cache, model load and warm-up in the background), the routers
and the edge middlewares (service/middleware.py).

The app answers /healthz as soon as it starts; /readyz and /classify answer 503 until the model is loaded and warmed
up (or with the reason it could not be loaded). ``uniguard serve`` loads the model before it starts listening, so a
missing, corrupt or incompatible model stops it (service/cli.py); only a missing *default* model starts not-ready.

Module map: ``app`` -> ``routers/*`` -> ``state`` (AppState, StateDep) -> ``runtime`` (GuardEngine: ONNX engine,
batcher, cache, admission) -> ``classifier`` / ``batcher`` / ``admission`` / ``cache`` -> ``engine``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from policies.registry import PolicyError, PolicyRegistry
from service.config import Settings, load_settings
from service.errors import install_error_handlers
from service.middleware import ApiKeyAuth, BodyGuard, RequestContext, is_public
from service.routers import admin, classify, docs, ops, playground, policies
from service.runtime import EngineFactory
from service.schemas import ErrorResponse
from service.state import AppState

log = logging.getLogger("uniguard.service")


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
    state = AppState.create(settings, engine_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # an invalid policy file stops the start-up
        state.set_registry(registry if registry is not None else PolicyRegistry.load(settings.policy_dirs))
        state.guard.open_cache()
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task[None]] = set()
        if handle_signals:

            def _on_sighup() -> None:
                task = loop.create_task(_reload_on_signal(state), name="uniguard-sighup-reload")
                reloads.add(task)
                task.add_done_callback(reloads.discard)

            loop.add_signal_handler(signal.SIGHUP, _on_sighup)
        # thresholds come from the model's manifest once it is loaded
        loader = asyncio.create_task(
            state.guard.start(on_loaded=lambda: state.set_registry(state.registry)), name="uniguard-load-model"
        )
        app.state.loader = loader
        try:
            yield
        finally:
            if handle_signals:
                loop.remove_signal_handler(signal.SIGHUP)
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            await state.guard.stop()
            log.info("shut down")

    error = {"model": ErrorResponse}
    app = FastAPI(
        title="UniGuard",
        version=__version__,
        summary="Guardrail classification: is this prompt safe under these policies?",
        description='Errors always have the body `{"error": {"code", "message", "field"}}`. When API keys are '
        "configured, every endpoint except the public probes needs `Authorization: Bearer <key>`.",
        lifespan=lifespan,
        docs_url=None,  # served offline by service/routers/docs.py
        redoc_url=None,
        responses={
            400: {"description": "body is not valid JSON or not UTF-8", **error},
            401: {"description": "missing or wrong API key (when keys are configured)", **error},
            408: {"description": "the body did not arrive within UNIGUARD_BODY_TIMEOUT_S; connection closed", **error},
            413: {
                "description": "body over UNIGUARD_MAX_BODY_BYTES, or a request too costly for the deadline",
                **error,
            },
            415: {"description": "content type is not application/json", **error},
            422: {"description": "invalid request; error.field names the offending field", **error},
            429: {"description": "overloaded; retry after Retry-After seconds", **error},
            500: {"description": "internal error (a bug: please report it)", **error},
            503: {"description": "not ready, shutting down or the model failed", **error},
        },
    )
    app.state.uniguard = state
    install_error_handlers(app)
    # add_middleware wraps: the last added runs first (RequestContext -> ApiKeyAuth -> BodyGuard -> routes)
    app.add_middleware(BodyGuard, state=state)
    app.add_middleware(ApiKeyAuth, settings=settings, metrics=state.metrics)
    app.add_middleware(RequestContext, metrics=state.metrics)

    app.include_router(classify.router)
    app.include_router(policies.router)
    app.include_router(ops.router)
    app.include_router(admin.router)
    docs.install(app)
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
                if not is_public(path, settings):
                    for operation in operations.values():
                        operation["security"] = [{"apiKey": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
