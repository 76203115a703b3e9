"""Helpers for the service tests: run the real app in-process (ASGI + lifespan), engine stubs."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI

from policies.instruction import Window
from service.app import create_app
from service.config import Settings
from service.engine import OnnxEngine


def make_settings(model_dir: Path, **overrides: Any) -> Settings:
    """Settings for tests, independent of the caller's UNIGUARD_* environment."""
    base: dict[str, Any] = {"model_dir": model_dir, "warmup_batches": 1, "redis_url": "", "config_file": None}
    return Settings(**{**base, **overrides})


@asynccontextmanager
async def running_app(
    settings: Settings, engine_factory: Callable[[Settings], OnnxEngine] | None = None, wait_ready: bool = True
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app with its lifespan running and an httpx client bound to it."""
    app = create_app(settings, engine_factory)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://uniguard.test") as client:
            if wait_ready:
                await asyncio.wait_for(asyncio.shield(app.state.loader), 60)
            yield app, client


class SlowEngine:
    """Wraps a real engine: every batch takes at least ``delay_s`` (to fill queues and pass deadlines)."""

    def __init__(self, inner: OnnxEngine, delay_s: float) -> None:
        self._inner, self.delay_s = inner, delay_s
        self.calls = 0

    def infer(self, windows: Sequence[Window]) -> np.ndarray:
        self.calls += 1
        time.sleep(self.delay_s)
        return self._inner.infer(windows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class GatedFactory:
    """An engine factory that blocks until ``release()`` (to observe the service before it is ready)."""

    def __init__(self, engine: OnnxEngine) -> None:
        self.engine = engine
        self.gate = threading.Event()

    def __call__(self, settings: Settings) -> OnnxEngine:
        if not self.gate.wait(30):
            raise RuntimeError("gate never released")
        return self.engine

    def release(self) -> None:
        self.gate.set()
