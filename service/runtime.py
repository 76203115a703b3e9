"""The serving engine: one object that owns the ONNX engine, the dynamic batcher, the verdict cache and the
admission controller, with ``start`` / ``stop`` and the one readiness check used by /readyz and /classify.

Modelled on infinity's ``AsyncEmbeddingEngine`` + ``BatchHandler`` and text-embeddings-inference's queue / batcher /
backend split: the HTTP layer never touches the ONNX session, the queue or the cache directly.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable

from export.manifest import Manifest
from service.admission import Admission
from service.batcher import DynamicBatcher
from service.cache import NullCache, ScoreCache, make_cache
from service.classifier import Classifier
from service.config import Settings
from service.engine import OnnxEngine
from service.errors import ServiceError
from service.metrics import Metrics

log = logging.getLogger("uniguard.service")
EngineFactory = Callable[[Settings], OnnxEngine]


def default_engine_factory(settings: Settings) -> OnnxEngine:
    model_dir = settings.resolved_model_dir
    if not model_dir.is_dir():
        raise ServiceError(
            503,
            "model_unavailable",
            f"model folder {model_dir} does not exist: build the default model with `make model`, "
            "or point UNIGUARD_MODEL_DIR (uniguard serve --model) at an exported model folder",
        )
    return OnnxEngine(model_dir, provider=settings.provider, threads=settings.intra_op_threads)


def measure_tokens_per_s(engine: OnnxEngine, batch_size: int, repeats: int = 1) -> float:
    """The engine's speed in model tokens per second on full batches of full-length windows (the admission
    budget's unit), through the same ``pair_windows`` and ``infer`` calls the batcher uses."""
    windows = engine.pair_windows([("Flags text that measures the speed of the engine.", "speed " * 2000)])[0]
    batch = (windows * batch_size)[:batch_size]
    engine.infer(batch)
    started = time.perf_counter()
    for _ in range(repeats):
        engine.infer(batch)
    elapsed = max(time.perf_counter() - started, 1e-6)
    return sum(len(w) for w in batch) * repeats / elapsed


class GuardEngine:
    """Model + batcher + cache + admission with a lifecycle: ``open_cache`` (at start-up, before the model), ``start``
    (load, warm up, measure, then ready; failures are reported by ``check``), ``stop`` (drain, close)."""

    def __init__(self, settings: Settings, metrics: Metrics, factory: EngineFactory | None = None) -> None:
        self.settings, self.metrics = settings, metrics
        self.factory = factory or default_engine_factory
        self.onnx: OnnxEngine | None = None
        self.batcher: DynamicBatcher | None = None
        self.cache: ScoreCache = NullCache()
        self.classifier: Classifier | None = None
        self.admission = Admission(settings, metrics)
        self.ready = False
        self.stopping = False
        self.status = "starting: loading the model"
        self.load_error: str | None = None

    @property
    def manifest(self) -> Manifest | None:
        return self.onnx.manifest if self.onnx is not None else None

    @property
    def model_id(self) -> str | None:
        return self.onnx.model_id if self.onnx is not None else None

    def open_cache(self) -> None:
        s = self.settings
        self.cache = make_cache(
            s.redis_url,
            s.cache_ttl_seconds,
            s.cache_max_entries,
            s.cache_key_prefix,
            self.metrics,
            s.redis_timeout_s,
            s.redis_backoff_max_s,
        )

    async def start(self, on_loaded: Callable[[], None] | None = None) -> None:
        """Load the engine off the event loop, warm it up, measure its speed, then mark the service ready.
        ``on_loaded`` runs once the model is loaded (the app re-resolves thresholds against its manifest)."""
        s = self.settings
        try:
            engine = await asyncio.to_thread(self.factory, s)
            self.onnx = engine
            self.status = "starting: warming up"
            await asyncio.to_thread(engine.warmup, s.warmup_batches)
            speed = s.engine_tokens_per_s
            if speed is None:
                speed = await asyncio.to_thread(measure_tokens_per_s, engine, s.max_batch_size)
        except Exception as exc:  # report any load failure through /readyz instead of crashing
            message = exc.message if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {exc}"
            self.onnx = None
            self.load_error = message
            self.status = f"model not loaded: {message}"
            log.error("model not loaded: %s", message)
            return
        self.admission.set_speed(speed, learn=s.engine_tokens_per_s is None)
        self.batcher = DynamicBatcher(
            engine,
            self.metrics,
            max_batch_size=s.max_batch_size,
            max_batch_tokens=s.max_batch_tokens,
            max_wait_ms=s.max_wait_ms,
            max_queue=s.max_queue,
            on_batch=self._on_batch,
        )
        self.batcher.max_batch_tokens = self.batch_tokens()
        self.batcher.start()
        self.classifier = Classifier(engine, self.batcher, self.cache, self.metrics, s, self.admission)
        if on_loaded is not None:
            on_loaded()
        manifest = engine.manifest
        self.metrics.model_info.labels(engine.model_id, manifest.target, engine.provider).set(1)
        self.metrics.watch_policy_cache(engine)
        # Everything allocated so far (model, tokenizer, registry, app) lives as long as the process: move it out of
        # the collector's reach so that full collections, which would otherwise walk it, stay short (latency tail).
        gc.collect()
        gc.freeze()
        self.ready = True
        self.status = "ready"
        self.metrics.ready.set(1)
        log.info(
            "model %s ready (%s, %s; %.0f tokens/s, admission budget %.0f tokens, batches of at most %d tokens)",
            engine.model_id,
            manifest.target,
            engine.provider,
            self.admission.tokens_per_s,
            self.admission.budget,
            self.batcher.max_batch_tokens,
        )

    def batch_tokens(self) -> int:
        """The batch token limit: UNIGUARD_MAX_BATCH_TOKENS, or less so that one batch takes about
        UNIGUARD_BATCH_TARGET_MS at the measured speed (on a CPU, batching adds little throughput, and every batch
        is time a newly arrived small request may have to wait)."""
        s = self.settings
        if s.batch_target_ms <= 0:
            return s.max_batch_tokens
        return max(1, min(s.max_batch_tokens, int(self.admission.tokens_per_s * s.batch_target_ms / 1000.0)))

    def _on_batch(self, windows: int, tokens: int, seconds: float) -> None:
        self.admission.observe_batch(windows, tokens, seconds)
        if self.batcher is not None:
            self.batcher.max_batch_tokens = self.batch_tokens()

    async def stop(self) -> None:
        """Refuse new work, finish what is queued (up to the request deadline), close the cache."""
        self.stopping = True
        self.ready = False
        self.metrics.ready.set(0)
        if self.batcher is not None:
            await self.batcher.close(drain_timeout_s=self.settings.request_timeout_s)
        await self.cache.close()

    def check(self) -> Classifier:
        """The one readiness check: the classifier if the service can classify, else a 503 saying why."""
        if self.stopping:
            raise ServiceError(503, "shutting_down", "the service is shutting down", headers={"Retry-After": "1"})
        if not self.ready or self.classifier is None:
            code = "model_unavailable" if self.load_error else "not_ready"
            raise ServiceError(
                503, code, f"the service cannot classify yet ({self.status})", headers={"Retry-After": "1"}
            )
        return self.classifier
