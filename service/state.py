"""The application state shared by the routers: settings, metrics, the policy registry and the serving engine.

Routers take it through one dependency, ``StateDep``; this module imports neither the app nor the routers, so
there is no import cycle between them (service/app.py imports both).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from export.manifest import Manifest
from policies.registry import PolicyError, PolicyRegistry
from service.classifier import ResolvedPolicy, resolve_registry
from service.config import Settings
from service.engine import OnnxEngine
from service.errors import ServiceError
from service.metrics import Metrics
from service.runtime import EngineFactory, GuardEngine
from service.schemas import ReloadResult

log = logging.getLogger("uniguard.service")


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    guard: GuardEngine
    registry: PolicyRegistry = field(default_factory=lambda: PolicyRegistry([]))
    resolved: dict[str, ResolvedPolicy] = field(default_factory=dict)
    inflight: int = 0
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    def create(cls, settings: Settings, engine_factory: EngineFactory | None = None) -> AppState:
        metrics = Metrics()
        return cls(settings=settings, metrics=metrics, guard=GuardEngine(settings, metrics, engine_factory))

    @property
    def engine(self) -> OnnxEngine | None:
        """The loaded ONNX engine (None until the model is loaded)."""
        return self.guard.onnx

    @property
    def manifest(self) -> Manifest | None:
        return self.guard.manifest

    def set_registry(self, registry: PolicyRegistry) -> None:
        """Swap the registry and its resolved thresholds together (one assignment each, no await between)."""
        if self.engine is not None:  # prefix mode: the registry's policy keys/values (new or changed texts only)
            self.engine.sync_policies([p.instruction_text() for p in registry])
        resolved = resolve_registry(registry, self.manifest)
        self.registry, self.resolved = registry, resolved

    def readiness(self) -> str:
        """The /readyz check: the engine's own check, then saturation for longer than the grace period."""
        self.guard.check()
        saturated = self.guard.admission.saturated_for()
        grace = self.settings.readiness_grace_s
        if saturated > grace:
            raise ServiceError(
                503,
                "saturated",
                f"saturated for {saturated:.1f} s (admitted work fills the budget or requests are being refused); "
                "send traffic elsewhere until it drains",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        return self.guard.status

    async def reload_policies(self) -> ReloadResult:
        """Re-read the policy folders; an invalid file raises PolicyError and the current registry keeps serving."""
        async with self.reload_lock:
            try:
                registry = await asyncio.to_thread(PolicyRegistry.load, self.settings.policy_dirs)
            except (PolicyError, OSError) as exc:
                self.metrics.policy_reloads.labels("rejected").inc()
                log.error("policy reload rejected, the previous registry keeps serving: %s", exc)
                raise PolicyError(str(exc)) from exc
            if self.engine is not None:  # prefix mode: compute changed policies off the event loop first
                await asyncio.to_thread(self.engine.sync_policies, [p.instruction_text() for p in registry])
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


async def get_state(request: Request) -> AppState:
    """Async: FastAPI would run a plain function in its thread pool."""
    state: AppState = request.app.state.uniguard
    return state


StateDep = Annotated[AppState, Depends(get_state)]
