"""Dependencies shared by the routers (async: FastAPI would run plain functions in its thread pool)."""

from __future__ import annotations

from fastapi import Request

from service.app import AppState


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.uniguard
    return state
