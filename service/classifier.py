"""The /classify pipeline: resolve policies and thresholds, look up the cache, batch the misses, build verdicts.

Threshold precedence (first that applies):
1. the request's ``thresholds`` override;
2. the manifest's calibrated threshold for the policy, if the model saw this exact policy text (same content hash);
3. the threshold written explicitly in the policy's YAML file (or given inline);
4. the manifest's ``default_threshold`` (zero-shot policies).

Without a loaded model (fail-open answers while not ready) steps 2 and 4 are skipped: the policy's own threshold.

A request's ``policies`` may name groups (``categories``); with ``categories: true``, a policy with a
``category_group`` (content_safety) names, on its unsafe verdicts, the policies of that group over their thresholds
(scored for the flagged texts only). Each
flagged text gets the safe reply (``response``) of its highest-scoring unsafe policy that has one.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, replace

from export.manifest import Manifest
from policies.labels import UNSAFE, verdict
from policies.registry import PolicyRegistry
from policies.schema import Policy, render_response
from policies.thresholds import policy_threshold
from service.admission import Admission, estimate_tokens
from service.batcher import DeadlineExceededError, DynamicBatcher, QueueFullError
from service.cache import CachedScore, ScoreCache, cache_key, text_hash
from service.config import Settings
from service.engine import OnnxEngine, aggregate
from service.errors import ServiceError
from service.metrics import Metrics
from service.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    FailMode,
    PolicyVerdict,
    Span,
    TextResult,
    Usage,
    is_valid_unicode,
)


@dataclass(frozen=True)
class ResolvedPolicy:
    name: str
    instruction: str
    content_hash: str
    threshold: float
    inline: bool
    response: str | None = None  # the rendered safe reply
    categories: tuple[ResolvedPolicy, ...] = ()  # the category_group's policies (registry order)


def registry_threshold(policy: Policy, manifest: Manifest | None) -> float:
    """Steps 2-4 of the precedence for a registry policy: the one rule of ``policies.thresholds``."""
    return policy_threshold(policy, manifest)


def _resolved(policy: Policy, threshold: float, inline: bool) -> ResolvedPolicy:
    response = render_response(policy.response, policy.name) if policy.response else None
    return ResolvedPolicy(policy.name, policy.instruction_text(), policy.content_hash, threshold, inline, response)


def resolve_registry(registry: PolicyRegistry, manifest: Manifest | None) -> dict[str, ResolvedPolicy]:
    """Instruction text, content hash, default threshold, reply and categories of every registry policy, once."""
    plain = {p.name: _resolved(p, registry_threshold(p, manifest), False) for p in registry}
    return {
        p.name: replace(
            plain[p.name], categories=tuple(plain[c.name] for c in registry.group(p.category_group) if c.name != p.name)
        )
        if p.category_group
        else plain[p.name]
        for p in registry
    }


def resolve_policies(
    request: ClassifyRequest,
    registry: PolicyRegistry,
    manifest: Manifest | None,
    settings: Settings,
    resolved: dict[str, ResolvedPolicy] | None = None,
) -> list[ResolvedPolicy]:
    """The request's policies with their thresholds; 4xx errors naming the offending field."""
    if request.policies is None:
        named = [] if request.custom_policies else registry.defaults()
    else:
        groups = registry.groups
        unknown = [n for n in request.policies if n not in registry and n not in groups]
        if unknown:
            raise ServiceError(
                422,
                "unknown_policy",
                f"unknown policy {', '.join(repr(n) for n in unknown)}; known: {', '.join(registry.names)}; "
                f"groups: {', '.join(groups)} (GET /policies lists them; inline policies go in custom_policies)",
                field="policies",
            )
        if len(set(request.policies)) != len(request.policies):
            raise ServiceError(422, "duplicate_policy", "a policy is named twice", field="policies")
        # a group stands for its policies; a policy reached twice (by name and through a group) is applied once
        names = [m for n in request.policies for m in ([n] if n in registry else groups[n])]
        named = [registry[n] for n in dict.fromkeys(names)]
    if len(request.custom_policies) > settings.max_custom_policies:
        raise ServiceError(
            422,
            "too_many_custom_policies",
            f"at most {settings.max_custom_policies} inline policies per request (UNIGUARD_MAX_CUSTOM_POLICIES)",
            field="custom_policies",
        )
    resolved = resolved if resolved is not None else resolve_registry(registry, manifest)
    out: list[ResolvedPolicy] = [resolved[p.name] for p in named]
    seen = {p.name for p in out}
    for i, inline in enumerate(request.custom_policies):
        if inline.name in seen or inline.name in registry or inline.name in registry.groups:
            raise ServiceError(
                422,
                "duplicate_policy",
                f"inline policy name {inline.name!r} clashes with a registry policy, a group or another inline "
                "policy; rename it",
                field=f"custom_policies.{i}.name",
            )
        seen.add(inline.name)
        policy = inline.to_policy()
        if inline.threshold is not None:
            policy = policy.model_copy(update={"threshold": inline.threshold})
        threshold = policy_threshold(policy, manifest, explicit=inline.threshold is not None)
        out.append(_resolved(policy, threshold, inline=True))
    if not out:
        raise ServiceError(422, "no_policies", "no policies to apply", field="policies")
    if len(out) > settings.max_policies_per_request:
        raise ServiceError(
            422,
            "too_many_policies",
            f"{len(out)} policies; at most {settings.max_policies_per_request} per request "
            "(UNIGUARD_MAX_POLICIES_PER_REQUEST)",
            field="policies",
        )
    for name, value in request.thresholds.items():
        if name not in seen and name in registry.groups:
            raise ServiceError(
                422,
                "unknown_policy",
                f"thresholds apply to policies, not groups: give one for each policy of {name!r} you want to change",
                field=f"thresholds.{name}",
            )
        if name not in seen:
            raise ServiceError(
                422,
                "unknown_policy",
                f"threshold given for {name!r}, which this request does not apply",
                field=f"thresholds.{name}",
            )
        if not 0.0 <= value <= 1.0:
            raise ServiceError(422, "invalid_threshold", "thresholds must lie in [0, 1]", field=f"thresholds.{name}")
    # (a category's override only exists when the request applies it; _categorise then reuses that verdict)
    out = [replace(p, threshold=request.thresholds[p.name]) if p.name in request.thresholds else p for p in out]
    return out if request.categories else [replace(p, categories=()) if p.categories else p for p in out]


def check_texts(texts: list[str], settings: Settings) -> None:
    if not texts:
        raise ServiceError(422, "empty_input", "input must hold at least one text", field="input")
    if len(texts) > settings.max_texts_per_request:
        raise ServiceError(
            422,
            "too_many_texts",
            f"{len(texts)} texts; at most {settings.max_texts_per_request} per request "
            "(UNIGUARD_MAX_TEXTS_PER_REQUEST)",
            field="input",
        )
    for i, text in enumerate(texts):
        if not is_valid_unicode(text):
            raise ServiceError(
                422, "invalid_text", "text is not valid Unicode (unpaired surrogate)", field=f"input.{i}"
            )
        if not text.strip():
            raise ServiceError(422, "empty_text", "texts must not be empty or whitespace only", field=f"input.{i}")
        if len(text) > settings.max_text_chars:
            raise ServiceError(
                422,
                "text_too_long",
                f"text has {len(text)} characters; at most {settings.max_text_chars} (UNIGUARD_MAX_TEXT_CHARS)",
                field=f"input.{i}",
            )


def effective_fail_mode(request: ClassifyRequest, settings: Settings) -> FailMode:
    """The server's fail mode, or the request's if it is stricter: a caller may ask for 'closed' on a fail-open
    server, but never for 'open' on a fail-closed one (that would let any caller switch the guard off)."""
    if request.fail_mode is None or request.fail_mode == settings.fail_mode:
        return settings.fail_mode
    if request.fail_mode == "closed":
        return "closed"
    raise ServiceError(
        422,
        "fail_open_not_allowed",
        "this server fails closed (UNIGUARD_FAIL_MODE=closed); a request may not ask for fail_mode 'open'",
        field="fail_mode",
    )


def fail_open_response(
    texts: list[str], policies: list[ResolvedPolicy], model_id: str | None, reason: str, started: float
) -> ClassifyResponse:
    """Every verdict 'safe' with score null and fail_open true; the response says it is degraded and why."""
    verdicts = {
        p.name: PolicyVerdict(verdict="safe", score=None, threshold=p.threshold, cached=False, fail_open=True)
        for p in policies
    }
    return ClassifyResponse(
        id=f"cls-{uuid.uuid4().hex[:16]}",
        model=model_id,
        results=[TextResult(flagged=False, policies=dict(verdicts)) for _ in texts],
        usage=Usage(texts=len(texts), policies=len(policies), tokens=0),
        latency_ms=round((time.monotonic() - started) * 1000.0, 3),
        fail_mode="open",
        degraded=True,
        degraded_reason=reason,
    )


def safe_reply(result: TextResult, policies: list[ResolvedPolicy]) -> str | None:
    """The reply of the highest-scoring unsafe policy that has one (first in request order on ties); when that
    verdict names categories, the reply of its highest-scoring category that has one, which is more specific."""
    if not result.flagged:
        return None
    best: tuple[float, ResolvedPolicy] | None = None
    for policy in policies:
        v = result.policies[policy.name]
        if v.verdict == UNSAFE and (policy.response or v.categories) and (best is None or (v.score or 0.0) > best[0]):
            best = (v.score or 0.0, policy)
    if best is None:
        return None
    policy = best[1]
    by_name = {c.name: c for c in policy.categories}
    for name in result.policies[policy.name].categories or []:
        if by_name[name].response:
            return by_name[name].response
    return policy.response


class Classifier:
    def __init__(
        self,
        engine: OnnxEngine,
        batcher: DynamicBatcher,
        cache: ScoreCache,
        metrics: Metrics,
        settings: Settings,
        admission: Admission,
    ) -> None:
        self.engine, self.batcher, self.cache = engine, batcher, cache
        self.metrics, self.settings, self.admission = metrics, settings, admission

    async def classify(
        self, texts: list[str], policies: list[ResolvedPolicy], fail_mode: FailMode = "closed"
    ) -> ClassifyResponse:
        """Verdicts for validated texts and resolved policies, within the per-request deadline (else
        DeadlineExceededError); QueueFullError when the batch queue is full; 429/413 ServiceError when admission
        refuses the request's cost."""
        started = time.monotonic()
        deadline = started + self.settings.request_timeout_s
        if self.batcher.full:  # refuse before tokenising: a flood costs no CPU and holds no memory
            raise QueueFullError(f"the batch queue is full ({self.batcher.depth} windows waiting)")
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                results, tokens = await self._score(texts, policies, deadline)
                tokens += await self._categorise(texts, policies, results, deadline)
        except TimeoutError:
            raise DeadlineExceededError("the request ran past its deadline") from None
        for result in results:
            result.response = safe_reply(result, policies)
        return ClassifyResponse(
            id=f"cls-{uuid.uuid4().hex[:16]}",
            model=self.engine.model_id,
            results=results,
            usage=Usage(texts=len(texts), policies=len(policies), tokens=tokens),
            latency_ms=round((time.monotonic() - started) * 1000.0, 3),
            fail_mode=fail_mode,
        )

    async def _categorise(
        self, texts: list[str], policies: list[ResolvedPolicy], results: list[TextResult], deadline: float
    ) -> int:
        """Fill ``categories`` on the unsafe verdicts of policies with a category group: the request's own verdicts
        for categories it applies, the others scored now for the flagged texts only. Returns the tokens used."""
        applied = {p.name for p in policies}
        tokens = 0
        for policy in policies:
            flagged = [ti for ti, r in enumerate(results) if r.policies[policy.name].verdict == UNSAFE]
            if not policy.categories or not flagged:
                continue
            missing = [c for c in policy.categories if c.name not in applied]
            extra: list[TextResult] = []
            if missing:
                extra, used = await self._score([texts[ti] for ti in flagged], missing, deadline)
                tokens += used
            for k, ti in enumerate(flagged):
                verdicts = {**(extra[k].policies if extra else {}), **results[ti].policies}
                fired = [c.name for c in policy.categories if verdicts[c.name].verdict == UNSAFE]
                fired.sort(key=lambda name: -(verdicts[name].score or 0.0))
                results[ti].policies[policy.name].categories = fired
        return tokens

    async def _score(
        self, texts: list[str], policies: list[ResolvedPolicy], deadline: float
    ) -> tuple[list[TextResult], int]:
        model_id = self.engine.model_id

        # 1. cache lookup: one batched round trip for every (text, policy) pair
        digests = [text_hash(t) for t in texts]
        pairs = [(ti, pi) for ti in range(len(texts)) for pi in range(len(policies))]
        keys = [cache_key(model_id, policies[pi].content_hash, digests[ti]) for ti, pi in pairs]
        found = await self.cache.get_many(keys)
        misses = [k for k, hit in enumerate(found) if hit is None]
        backend = self.cache.backend
        if backend != "none":
            self.metrics.cache_hits.labels(backend).inc(len(pairs) - len(misses))
            self.metrics.cache_misses.labels(backend).inc(len(misses))

        # 2. admit the misses' cost (estimated from characters, then exact once tokenised), then score them through
        #    the batcher
        computed: dict[int, CachedScore] = {}
        tokens = 0
        if misses:
            miss_pairs = [(policies[pairs[k][1]].instruction, texts[pairs[k][0]]) for k in misses]
            max_length = self.engine.manifest.encoding.max_length
            estimate = sum(estimate_tokens(len(p), len(t), max_length) for p, t in miss_pairs)
            ticket = self.admission.admit(estimate)
            try:
                t0 = time.monotonic()
                per_pair = await asyncio.to_thread(self.engine.pair_windows, miss_pairs)
                self.metrics.tokenize_seconds.observe(time.monotonic() - t0)
                flat = [w for ws in per_pair for w in ws]
                tokens = sum(len(w) for w in flat)
                self.admission.resize(ticket, tokens)
                scores = await self.batcher.score(flat, deadline)
            finally:
                self.admission.release(ticket)
            for k, pair_score in zip(misses, aggregate(per_pair, scores), strict=True):
                computed[k] = CachedScore(pair_score.score, pair_score.char_start, pair_score.char_end)
            await self.cache.set_many([(keys[k], v) for k, v in computed.items()])

        # 3. verdicts
        results: list[TextResult] = []
        for ti, text in enumerate(texts):
            verdicts: dict[str, PolicyVerdict] = {}
            for pi, policy in enumerate(policies):
                k = ti * len(policies) + pi
                hit = found[k]
                value = hit if hit is not None else computed[k]
                label = verdict(value.score, policy.threshold)
                whole = value.char_start <= 0 and value.char_end >= len(text)
                verdicts[policy.name] = PolicyVerdict(
                    verdict=label,
                    score=value.score,
                    threshold=policy.threshold,
                    cached=hit is not None,
                    span=None if whole else Span(start=value.char_start, end=value.char_end),
                )
                self.metrics.verdicts.labels("custom" if policy.inline else policy.name, label).inc()
            results.append(TextResult(flagged=any(v.verdict == UNSAFE for v in verdicts.values()), policies=verdicts))
        return results, tokens
