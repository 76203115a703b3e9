"""Operational endpoints: /healthz, /readyz, /metrics, /version."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.metrics import CONTENT_TYPE
from service.schemas import ErrorResponse, Health, Readiness, VersionInfo
from service.state import StateDep

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Alive (the process answers)")
async def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Ready: model loaded and warmed up, and not saturated",
    responses={503: {"model": ErrorResponse, "description": "not ready or saturated; the message says why"}},
)
async def readyz(state: StateDep) -> Readiness:
    """503 until the model is loaded and warmed up, while shutting down, and once the service has been saturated
    (admitted work fills the budget, or requests are refused for capacity) for UNIGUARD_READINESS_GRACE_S, so a
    load balancer drains the pod; /healthz stays liveness only."""
    detail = state.readiness()
    return Readiness(ready=True, model=state.guard.model_id, detail=detail)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"description": "Prometheus text", "content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}},
)
async def metrics(state: StateDep) -> Response:
    if state.guard.batcher is not None:
        state.metrics.queue_depth.set(state.guard.batcher.depth)
    return Response(content=state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/version", response_model=VersionInfo, summary="Service and model versions")
async def version(state: StateDep) -> VersionInfo:
    from uniguard import __version__

    engine = state.engine
    return VersionInfo(
        service=__version__,
        model=engine.model_id if engine else None,
        model_target=engine.manifest.target if engine else None,
        provider=state.settings.provider,
    )
