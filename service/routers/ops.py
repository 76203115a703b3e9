"""Operational endpoints: /healthz, /readyz, /metrics, /version."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from service.app import AppState
from service.errors import ServiceError
from service.metrics import CONTENT_TYPE
from service.routers.deps import get_state
from service.schemas import ErrorResponse, Health, Readiness, VersionInfo

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Alive (the process answers)")
async def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Ready: model loaded and warmed up",
    responses={503: {"model": ErrorResponse, "description": "not ready; the message says why"}},
)
async def readyz(state: Annotated[AppState, Depends(get_state)]) -> Readiness:
    if not state.ready or state.engine is None:
        code = "model_unavailable" if state.load_error else "not_ready"
        raise ServiceError(503, code, state.status, headers={"Retry-After": "1"})
    return Readiness(ready=True, model=state.engine.model_id, detail=state.status)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"description": "Prometheus text", "content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}},
)
async def metrics(state: Annotated[AppState, Depends(get_state)]) -> Response:
    if state.batcher is not None:
        state.metrics.queue_depth.set(state.batcher.depth)
    return Response(content=state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/version", response_model=VersionInfo, summary="Service and model versions")
async def version(state: Annotated[AppState, Depends(get_state)]) -> VersionInfo:
    from uniguard import __version__

    engine = state.engine
    return VersionInfo(
        service=__version__,
        model=engine.model_id if engine else None,
        model_target=engine.manifest.target if engine else None,
        provider=state.settings.provider,
    )
