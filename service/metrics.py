"""Prometheus metrics, one CollectorRegistry per app (so tests and several apps never clash)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "uniguard_requests_total",
            "HTTP requests by endpoint and status",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "uniguard_request_duration_seconds",
            "HTTP request latency by endpoint and status",
            ["endpoint", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "uniguard_queue_wait_seconds",
            "time a window waited in the batch queue",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokenize_seconds = Histogram(
            "uniguard_tokenize_seconds", "tokenisation time per request", buckets=LATENCY_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            "uniguard_inference_seconds", "model time per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram("uniguard_batch_size", "windows per model batch", buckets=SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram(
            "uniguard_batch_tokens", "padded tokens per model batch", buckets=TOKEN_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("uniguard_queue_depth", "windows waiting in the batch queue", registry=r)
        self.queue_rejected = Counter(
            "uniguard_queue_rejected_total", "requests refused with 429 because the queue was full", registry=r
        )
        self.deadline_exceeded = Counter(
            "uniguard_deadline_exceeded_total", "requests that ran past their deadline", registry=r
        )
        self.cache_hits = Counter("uniguard_cache_hits_total", "verdict cache hits", ["backend"], registry=r)
        self.cache_misses = Counter("uniguard_cache_misses_total", "verdict cache misses", ["backend"], registry=r)
        self.cache_errors = Counter(
            "uniguard_cache_errors_total",
            "cache backend errors (requests went on without the cache)",
            ["backend"],
            registry=r,
        )
        self.cache_bypassed = Counter(
            "uniguard_cache_bypassed_total", "lookups skipped while the cache backend was down", ["backend"], registry=r
        )
        self.verdicts = Counter(
            "uniguard_verdicts_total",
            "verdicts by policy (inline policies as 'custom')",
            ["policy", "verdict"],
            registry=r,
        )
        self.model_info = Gauge(
            "uniguard_model_info", "the loaded model (value 1)", ["model", "target", "provider"], registry=r
        )
        self.ready = Gauge("uniguard_ready", "1 when the model is loaded and warmed up", registry=r)
        # Prefix-mode models: the policy keys/values cache (scoring/prefix.py); 0 for full-mode models.
        self.policy_cache_policies = Gauge(
            "uniguard_policy_cache_policies",
            "policies whose keys/values are cached: registry (pinned) or inline (LRU)",
            ["kind"],
            registry=r,
        )
        self.policy_cache_bytes_per_policy = Gauge(
            "uniguard_policy_cache_bytes_per_policy", "memory of one cached policy's keys/values (bytes)", registry=r
        )
        self.inflight = Gauge(
            "uniguard_inflight_requests",
            "requests being handled, counted once their body is read (probes excluded)",
            registry=r,
        )
        self.inflight_rejected = Counter(
            "uniguard_inflight_rejected_total",
            "requests refused with 429 because UNIGUARD_MAX_INFLIGHT_REQUESTS were in flight",
            registry=r,
        )
        self.admission_budget = Gauge(
            "uniguard_admission_budget_tokens",
            "model tokens the engine can finish within one request deadline (the admission budget)",
            registry=r,
        )
        self.admitted_tokens = Gauge(
            "uniguard_admitted_tokens", "model tokens admitted and not finished yet", registry=r
        )
        self.admission_rejected = Counter(
            "uniguard_admission_rejected_total",
            "requests refused by cost-aware admission (overloaded: 429, too_costly: 413)",
            ["reason"],
            registry=r,
        )
        self.client_timeouts = Counter(
            "uniguard_client_timeouts_total",
            "requests whose body did not arrive within UNIGUARD_BODY_TIMEOUT_S (408, connection closed)",
            registry=r,
        )
        self.auth_failures = Counter(
            "uniguard_auth_failures_total", "requests refused with 401 (missing or wrong API key)", registry=r
        )
        self.fail_open = Counter(
            "uniguard_fail_open_total",
            "requests answered with fail-open 'safe' verdicts, by the error they would have got",
            ["reason"],
            registry=r,
        )
        self.policy_reloads = Counter(
            "uniguard_policy_reloads_total", "policy registry reloads by result (ok, rejected)", ["result"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def watch_policy_cache(self, engine: Any) -> None:
        """Report the engine's policy cache at every scrape (prefix mode)."""
        self.policy_cache_bytes_per_policy.set(engine.bytes_per_cached_policy)
        self.policy_cache_policies.labels("registry").set_function(lambda: engine.pinned_policies)
        self.policy_cache_policies.labels("inline").set_function(
            lambda: engine.cached_policies - engine.pinned_policies
        )
