"""Dependencies shared by the routers (async: FastAPI would run plain functions in its thread pool)."""

from __future__ import annotations

from fastapi import Request

from service.app import AppState
from service.classifier import Classifier
from service.errors import ServiceError


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.uniguard
    return state


async def get_classifier(request: Request) -> Classifier:
    state: AppState = request.app.state.uniguard
    if not state.ready or state.classifier is None:
        code = "model_unavailable" if state.load_error else "not_ready"
        raise ServiceError(503, code, f"the service cannot classify yet ({state.status})", headers={"Retry-After": "1"})
    return state.classifier
