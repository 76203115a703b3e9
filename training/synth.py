"""Policy-driven synthetic data from any OpenAI-compatible chat-completions endpoint (``uniguard synth``).

Flow: load the policy -> read the existing output (resume) and ``--against`` files into the dedup index ->
generate balanced batches with bounded concurrency, appending accepted rows as they come -> self-review a sample
(relabel disagreements, propose clearer policy wording) -> write ``<out>.refined_policy.yaml`` and
``<out>.report.json`` beside the data.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import itertools
import json
import math
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from policies.labels import SAFE, UNSAFE, Label
from policies.registry import load_policy_file
from policies.schema import Policy
from training.synth_dedup import Deduper, Embedder
from training.synth_prompts import (
    GeneratedItem,
    MalformedAnswer,
    Verdict,
    diversity_hints,
    generation_messages,
    parse_generation,
    parse_policy_proposal,
    parse_review,
    review_messages,
    rewrite_messages,
)

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]
RETRYABLE_STATUS = {408, 409, 425, 429}
MAX_RETRY_AFTER_S = 600.0


class SynthError(RuntimeError):
    """The run cannot continue; the message says why and what to do (rows written so far are kept)."""


class SynthRow(BaseModel):
    """One output row: the shared JSONL row format plus the generator's rationale."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1)
    label: Label
    policy: str
    source: str
    license: str
    category: str | None = None
    lang: str
    rationale: str


class SynthConfig(BaseModel):
    """Everything a run needs (the CLI flags)."""

    model_config = ConfigDict(extra="forbid")

    policy_file: Path
    out: Path
    n: int = Field(gt=0)
    endpoint: str = Field(min_length=1)
    model: str = Field(min_length=1)
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = Field(default=4, ge=1, le=256)
    batch_size: int = Field(default=10, ge=1, le=100)
    refine_sample: float = Field(default=0.2, ge=0.0, le=1.0)
    dedup_threshold: float = Field(default=0.92, gt=0.0, le=1.0)
    against: list[Path] = Field(default_factory=list)
    temperature: float = Field(default=0.9, ge=0.0, le=2.0)
    max_tokens: int = Field(default=3000, ge=64)
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=5, ge=0)
    backoff_base_s: float = Field(default=1.0, ge=0.0)
    backoff_max_s: float = Field(default=60.0, ge=0.0)
    max_requests: int | None = Field(default=None, ge=1)
    price_per_1k: float | None = Field(default=None, ge=0.0)
    price_per_1k_completion: float | None = Field(default=None, ge=0.0)
    seed: int = 0
    languages: list[str] = Field(default_factory=lambda: ["en", "de", "es", "fr"], min_length=1)
    license: str = "synthetic"
    json_mode: bool = True
    avoid_recent: int = Field(default=5, ge=0)
    progress: bool = True

    @property
    def source(self) -> str:
        return f"synth:{self.model}"

    @property
    def report_path(self) -> Path:
        return self.out.with_suffix(".report.json")

    @property
    def refined_policy_path(self) -> Path:
        return self.out.with_suffix(".refined_policy.yaml")


class SynthStats(BaseModel):
    """Counters of one run (the report also sums them over resumed runs)."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_missing: int = 0
    retries: int = 0
    malformed: int = 0
    rate_limited: int = 0
    server_errors: int = 0
    timeouts: int = 0
    connection_errors: int = 0
    generation_requests: int = 0
    review_requests: int = 0
    invalid_items: int = 0
    surplus_items: int = 0
    duplicates_exact: int = 0
    duplicates_near: int = 0
    accepted: int = 0

    @property
    def duplicates_removed(self) -> int:
        return self.duplicates_exact + self.duplicates_near

    def plus(self, other: SynthStats) -> SynthStats:
        mine, theirs = self.model_dump(), other.model_dump()
        return SynthStats(**{key: mine[key] + theirs[key] for key in mine})


class RefinementReport(BaseModel):
    sampled: int = 0
    reviewed: int = 0
    invalid_verdicts: int = 0
    relabels: int = 0
    relabelled_to_safe: int = 0
    relabelled_to_unsafe: int = 0
    refined_policy: str | None = None
    changes: list[str] = Field(default_factory=list)
    error: str | None = None


class CostSummary(BaseModel):
    calls: int
    prompt_tokens: int
    completion_tokens: int
    estimated_cost: float | None = None


class SynthReport(BaseModel):
    """``<out>.report.json``."""

    policy: str
    policy_file: str
    model: str
    endpoint: str
    out: str
    n_target: int
    rows: int
    complete: bool
    resumed_rows: int
    label_balance: dict[str, int]
    label_balance_generated: dict[str, int]
    duplicates_removed: int
    stats: SynthStats
    totals: SynthStats
    refinement: RefinementReport | None = None
    cost: CostSummary
    elapsed_s: float
    finished_at: str


# ---------------------------------------------------------------------------------------------------------------
# HTTP client
# ---------------------------------------------------------------------------------------------------------------


class _Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Message(BaseModel):
    content: str | None = None


class _Choice(BaseModel):
    message: _Message
    finish_reason: str | None = None


class _ChatResponse(BaseModel):
    choices: list[_Choice] = Field(min_length=1)
    usage: _Usage | None = None


class _Retry(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent or invalid."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random, retry_after: float | None = None) -> float:
    """Exponential backoff with jitter (half fixed, half random); a server's Retry-After is a lower bound."""
    delay = min(cap, base * (2**attempt))
    delay = delay / 2 + rng.uniform(0, delay / 2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
    return delay


def chat_url(endpoint: str) -> str:
    """``{endpoint}/chat/completions`` (an endpoint that already ends with it is used as is)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/chat/completions") else f"{endpoint}/chat/completions"


class ChatClient:
    """An async chat-completions client: bounded in-flight calls, retries, usage accounting, strict JSON answers."""

    def __init__(
        self,
        endpoint: str,
        model: str,
        api_key: str | None,
        stats: SynthStats,
        *,
        concurrency: int = 4,
        timeout_s: float = 120.0,
        max_retries: int = 5,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        json_mode: bool = True,
        seed: int = 0,
        sleep: Sleep = asyncio.sleep,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = chat_url(endpoint)
        self.model = model
        self.stats = stats
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.json_mode = json_mode
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._semaphore = asyncio.Semaphore(concurrency)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(timeout_s), transport=transport, trust_env=False
        )

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    async def _post(self, messages: list[dict[str, str]], temperature: float, max_tokens: int) -> str | None:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": max_tokens,
        }
        if self.json_mode:
            payload["response_format"] = {"type": "json_object"}
        async with self._semaphore:
            self.stats.calls += 1
            try:
                response = await self._http.post(self.url, json=payload)
            except httpx.TimeoutException as exc:
                self.stats.timeouts += 1
                raise _Retry(f"timeout ({type(exc).__name__})") from exc
            except httpx.TransportError as exc:
                self.stats.connection_errors += 1
                raise _Retry(f"connection error ({exc})") from exc
        status = response.status_code
        if status == 429 or status in RETRYABLE_STATUS or status >= 500:
            if status == 429:
                self.stats.rate_limited += 1
            elif status >= 500:
                self.stats.server_errors += 1
            raise _Retry(f"HTTP {status}", parse_retry_after(response.headers.get("retry-after")))
        if status >= 400:
            hint = {
                401: f"check the API key (the environment variable named by --api-key-env) for {self.url}",
                403: f"the key is not allowed to use model {self.model!r} at {self.url}",
                404: f"check --endpoint (expects the base URL, e.g. http://host:8000/v1) and --model; got {self.url}",
                400: "the server rejected the request; if it does not support response_format, pass --no-json-mode",
            }.get(status, "see the server's message")
            raise SynthError(f"{self.url} answered HTTP {status}: {response.text[:300]!r}; {hint}")
        try:
            body = _ChatResponse.model_validate_json(response.content)
        except ValidationError as exc:
            raise MalformedAnswer("the response is not a chat completion") from exc
        if body.usage is None:
            self.stats.usage_missing += 1
        else:
            self.stats.prompt_tokens += body.usage.prompt_tokens
            self.stats.completion_tokens += body.usage.completion_tokens
        return body.choices[0].message.content

    async def complete_json(
        self,
        messages: list[dict[str, str]],
        parse: Callable[[str | None], T],
        *,
        temperature: float = 0.9,
        max_tokens: int = 3000,
    ) -> T:
        """Call the endpoint and parse the answer; retries on 429/5xx/timeouts (with backoff) and malformed JSON."""
        attempt = 0
        while True:
            retry_after: float | None = None
            try:
                return parse(await self._post(messages, temperature, max_tokens))
            except _Retry as exc:
                reason, retry_after = exc.reason, exc.retry_after
            except MalformedAnswer as exc:
                self.stats.malformed += 1
                reason = f"malformed answer: {exc}"
            if attempt >= self.max_retries:
                raise SynthError(
                    f"{self.url}: giving up after {attempt + 1} attempts (last: {reason}); "
                    "rows written so far are kept, rerun the same command to resume"
                )
            self.stats.retries += 1
            await self._sleep(backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s, self._rng, retry_after))
            attempt += 1


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------


def read_rows(path: Path, policy: str, log: Callable[[str], None] = print) -> list[SynthRow]:
    """Rows of an earlier (possibly interrupted) run; a torn last line is dropped and the file repaired."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows: list[SynthRow] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = SynthRow.model_validate_json(line)
        except ValidationError as exc:
            if number == len(lines):
                log(f"{path}:{number}: dropping a torn last line from an interrupted run")
                _write_rows(path, rows)
                break
            raise SynthError(
                f"{path}:{number}: not a synth row ({exc.errors()[0]['msg']}); use another --out or fix the file"
            ) from exc
        if row.policy != policy:
            raise SynthError(
                f"{path}:{number}: holds rows for policy {row.policy!r}, not {policy!r}; use another --out"
            )
        rows.append(row)
    return rows


def read_texts(path: Path) -> list[str]:
    """The ``text`` of every row of a JSONL file (for ``--against``)."""
    if not path.is_file():
        raise SynthError(f"--against {path}: file not found")
    texts: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SynthError(f"--against {path}:{number}: not JSON ({exc.msg})") from exc
            if not isinstance(value, dict) or not isinstance(value.get("text"), str):
                raise SynthError(f'--against {path}:{number}: expected a row with a "text" string')
            texts.append(value["text"])
    return texts


def _write_rows(path: Path, rows: Sequence[SynthRow]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(row.model_dump_json() + "\n")
    os.replace(tmp, path)


def write_refined_policy(path: Path, policy: Policy, source: Path, note: str, changes: list[str]) -> None:
    header = [f"# Refined by `uniguard synth` from {source} ({note}). Review it before use;", "# changes proposed:"]
    header += [f"#   - {change}" for change in changes] or ["#   (none listed)"]
    body = yaml.safe_dump(policy.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=110)
    path.write_text("\n".join(header) + "\n" + body, encoding="utf-8")
    load_policy_file(path)  # the file must load exactly as the registry will load it


def label_balance(rows: Sequence[SynthRow]) -> dict[str, int]:
    counts = Counter(row.label for row in rows)
    return {SAFE: counts.get(SAFE, 0), UNSAFE: counts.get(UNSAFE, 0)}


def _raise_first(group: BaseExceptionGroup[Any]) -> None:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            _raise_first(exc)
        elif not isinstance(exc, asyncio.CancelledError):
            raise exc
    raise group


# ---------------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------------


class SynthJob:
    """One run of ``uniguard synth`` (generation, refinement, report)."""

    def __init__(
        self,
        cfg: SynthConfig,
        embedder: Embedder,
        *,
        sleep: Sleep = asyncio.sleep,
        transport: httpx.AsyncBaseTransport | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.cfg = cfg
        self.policy = load_policy_file(cfg.policy_file)
        self.deduper = Deduper(embedder, cfg.dedup_threshold)
        self.stats = SynthStats()
        self.log = log
        self._sleep = sleep
        self._transport = transport
        self._rng = random.Random(cfg.seed)
        self.rows: list[SynthRow] = []
        self._targets = {UNSAFE: cfg.n // 2, SAFE: cfg.n - cfg.n // 2}

    def _client(self) -> ChatClient:
        cfg = self.cfg
        api_key = os.environ.get(cfg.api_key_env) or None
        if api_key is None:
            self.log(f"note: ${cfg.api_key_env} is not set; calling {cfg.endpoint} without an API key")
        return ChatClient(
            cfg.endpoint,
            cfg.model,
            api_key,
            self.stats,
            concurrency=cfg.concurrency,
            timeout_s=cfg.timeout_s,
            max_retries=cfg.max_retries,
            backoff_base_s=cfg.backoff_base_s,
            backoff_max_s=cfg.backoff_max_s,
            json_mode=cfg.json_mode,
            seed=cfg.seed,
            sleep=self._sleep,
            transport=self._transport,
        )

    def _needed(self) -> dict[Label, int]:
        have = label_balance(self.rows)
        return {label: max(0, self._targets[label] - have[label]) for label in (UNSAFE, SAFE)}

    def _done(self) -> bool:
        return len(self.rows) >= self.cfg.n or sum(self._needed().values()) == 0

    def _split(self) -> tuple[int, int]:
        """How many unsafe and safe items the next request asks for: balanced by what is still needed."""
        need = self._needed()
        total = need[UNSAFE] + need[SAFE]
        size = max(1, min(self.cfg.batch_size, total + 2))
        if need[SAFE] == 0:
            return size, 0
        if need[UNSAFE] == 0:
            return 0, size
        n_unsafe = round(size * need[UNSAFE] / total)
        if size >= 2:
            n_unsafe = min(size - 1, max(1, n_unsafe))
        return n_unsafe, size - n_unsafe

    def _accept(self, items: list[GeneratedItem], handle: Any, progress: Any) -> None:
        """Dedup and write one batch (runs in a worker thread, under the job lock)."""
        need = self._needed()
        room = len(self.rows) < self.cfg.n
        candidates: list[GeneratedItem] = []
        for item in items:
            if room and need[item.label] > 0:
                candidates.append(item)
                need[item.label] -= 1
            else:
                self.stats.surplus_items += 1
        kinds = self.deduper.filter([item.text for item in candidates])
        accepted: list[SynthRow] = []
        for item, kind in zip(candidates, kinds, strict=True):
            if kind == "exact":
                self.stats.duplicates_exact += 1
            elif kind == "near":
                self.stats.duplicates_near += 1
            elif len(self.rows) + len(accepted) < self.cfg.n:
                accepted.append(
                    SynthRow(
                        text=item.text,
                        label=item.label,
                        policy=self.policy.name,
                        source=self.cfg.source,
                        license=self.cfg.license,
                        category=item.category,
                        lang=item.lang.lower().replace("_", "-"),
                        rationale=item.rationale,
                    )
                )
        if accepted:
            handle.write("".join(row.model_dump_json() + "\n" for row in accepted))
            handle.flush()
            os.fsync(handle.fileno())
            self.rows.extend(accepted)
            self.stats.accepted += len(accepted)
            progress.update(len(accepted))
        progress.set_postfix(calls=self.stats.calls, dups=self.stats.duplicates_removed, refresh=False)

    async def _generate(self, client: ChatClient) -> None:
        from tqdm.auto import tqdm

        cfg = self.cfg
        remaining = sum(self._needed().values())
        budget = cfg.max_requests or max(10, 4 * math.ceil(remaining / cfg.batch_size) + cfg.concurrency)
        counter = itertools.count()
        lock = asyncio.Lock()
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        progress = tqdm(
            total=cfg.n, initial=len(self.rows), unit="row", desc=f"synth {self.policy.name}", disable=not cfg.progress
        )

        async def worker(handle: Any) -> None:
            while not self._done():
                index = next(counter)
                if index >= budget:
                    return
                async with lock:
                    n_unsafe, n_safe = self._split()
                    avoid = self._rng.sample([r.text for r in self.rows], min(cfg.avoid_recent, len(self.rows)))
                hints = diversity_hints(index, cfg.seed, cfg.languages)
                messages = generation_messages(self.policy, n_unsafe, n_safe, hints, avoid)
                items, invalid = await client.complete_json(
                    messages, parse_generation, temperature=cfg.temperature, max_tokens=cfg.max_tokens
                )
                self.stats.generation_requests += 1
                self.stats.invalid_items += invalid
                async with lock:
                    await asyncio.to_thread(self._accept, items, handle, progress)

        try:
            with cfg.out.open("a", encoding="utf-8") as handle:
                try:
                    async with asyncio.TaskGroup() as group:
                        for _ in range(cfg.concurrency):
                            group.create_task(worker(handle))
                except BaseExceptionGroup as group_error:
                    _raise_first(group_error)
        finally:
            progress.close()
        if not self._done():
            self.log(
                f"warning: stopped after {budget} generation requests with {len(self.rows)}/{cfg.n} rows "
                "(the endpoint returned too few valid, unique items); rerun to continue or raise --max-requests"
            )

    async def _refine(self, client: ChatClient) -> tuple[RefinementReport, Policy | None]:
        """Self-review a sample: relabel disagreements and ask for clearer policy wording."""
        cfg = self.cfg
        report = RefinementReport()
        k = min(len(self.rows), max(1, round(cfg.refine_sample * len(self.rows))))
        sample = sorted(random.Random(cfg.seed + 1).sample(range(len(self.rows)), k))
        report.sampled = len(sample)
        chunks = [sample[i : i + cfg.batch_size] for i in range(0, len(sample), cfg.batch_size)]
        verdicts: dict[int, Verdict] = {}

        async def review(chunk: list[int]) -> None:
            ids = set(range(len(chunk)))
            found, invalid = await client.complete_json(
                review_messages(self.policy, [(j, self.rows[i].text) for j, i in enumerate(chunk)]),
                lambda content: parse_review(content, ids),
                temperature=0.0,
                max_tokens=cfg.max_tokens,
            )
            self.stats.review_requests += 1
            report.invalid_verdicts += invalid
            for j, verdict in found.items():
                verdicts[chunk[j]] = verdict

        try:
            async with asyncio.TaskGroup() as group:
                for chunk in chunks:
                    group.create_task(review(chunk))
        except BaseExceptionGroup as group_error:
            _raise_first(group_error)

        report.reviewed = len(verdicts)
        disagreements: list[dict[str, str]] = []
        agreed: list[dict[str, str]] = []
        relabelled: list[SynthRow] = []
        for index, verdict in sorted(verdicts.items()):
            row = self.rows[index]
            if verdict.label == row.label:
                agreed.append({"text": row.text[:500], "label": row.label})
                continue
            disagreements.append(
                {
                    "text": row.text[:500],
                    "generated_label": row.label,
                    "review_label": verdict.label,
                    "review_reason": verdict.reason,
                }
            )
            reason = verdict.reason or "the review disagreed"
            fixed = row.model_copy(
                update={
                    "label": verdict.label,
                    "category": None,  # the generator's category described the old label
                    "rationale": f"{reason} (relabelled from {row.label} by self-review)",
                }
            )
            self.rows[index] = fixed
            relabelled.append(fixed)
            report.relabels += 1
            if verdict.label == SAFE:
                report.relabelled_to_safe += 1
            else:
                report.relabelled_to_unsafe += 1
        if report.relabels:
            _write_rows(cfg.out, self.rows)

        try:
            proposed, changes = await client.complete_json(
                rewrite_messages(self.policy, disagreements[:20], agreed[:10]),
                lambda content: parse_policy_proposal(content, self.policy),
                temperature=0.2,
                max_tokens=cfg.max_tokens,
            )
        except SynthError as exc:
            report.error = str(exc)
            self.log(f"warning: no refined policy: {exc}")
            return report, None
        extra = [{"text": row.text[:2000], "label": row.label} for row in relabelled[:5]]
        examples = [ex.model_dump() for ex in proposed.examples] + extra
        refined = Policy.model_validate({**proposed.model_dump(), "examples": examples[:50]})
        note = f"self-review of {report.reviewed} generated items, {report.relabels} relabelled"
        write_refined_policy(cfg.refined_policy_path, refined, cfg.policy_file, note, changes)
        report.refined_policy = str(cfg.refined_policy_path)
        report.changes = changes
        return report, refined

    def _previous_report(self) -> SynthReport | None:
        path = self.cfg.report_path
        if not path.is_file():
            return None
        try:
            return SynthReport.model_validate_json(path.read_text(encoding="utf-8"))
        except ValidationError:
            self.log(f"note: ignoring unreadable earlier report {path}")
            return None

    async def run(self) -> SynthReport:
        cfg = self.cfg
        started = time.monotonic()
        self.rows = read_rows(cfg.out, self.policy.name, self.log)
        resumed = len(self.rows)
        previous = self._previous_report()
        already_refined = (
            previous is not None
            and previous.refinement is not None
            and previous.refinement.error is None
            and previous.rows == resumed
        )
        if resumed:
            self.log(f"resuming: {cfg.out} already holds {resumed} rows")
        if self._done() and (cfg.refine_sample == 0 or already_refined):
            self.log(f"nothing to do: {cfg.out} holds {resumed} rows (target {cfg.n})")
            kept = previous.refinement if previous is not None else None
            return self._report(previous, resumed, label_balance(self.rows), kept, started)

        index_start = time.monotonic()
        self.deduper.add_many(row.text for row in self.rows)
        for path in cfg.against:
            added = self.deduper.add_many(read_texts(path))
            self.log(f"dedup against {path}: {added} texts")
        if len(self.deduper):
            self.log(f"dedup index: {len(self.deduper)} texts ({time.monotonic() - index_start:.1f} s)")

        refinement: RefinementReport | None = None
        async with self._client() as client:
            try:
                if not self._done():
                    await self._generate(client)
                generated_balance = label_balance(self.rows)
                if cfg.refine_sample > 0 and self.rows:
                    refinement, _ = await self._refine(client)
            except BaseException:
                self._write_report(self._report(previous, resumed, label_balance(self.rows), None, started))
                raise
        report = self._report(previous, resumed, generated_balance, refinement, started)
        self._write_report(report)
        return report

    def _report(
        self,
        previous: SynthReport | None,
        resumed: int,
        generated_balance: dict[str, int],
        refinement: RefinementReport | None,
        started: float,
    ) -> SynthReport:
        cfg = self.cfg
        totals = previous.totals.plus(self.stats) if previous is not None else self.stats.model_copy()
        cost = None
        if cfg.price_per_1k is not None:
            completion_price = cfg.price_per_1k_completion
            if completion_price is None:
                completion_price = cfg.price_per_1k
            cost = (
                self.stats.prompt_tokens * cfg.price_per_1k + self.stats.completion_tokens * completion_price
            ) / 1000
        return SynthReport(
            policy=self.policy.name,
            policy_file=str(cfg.policy_file),
            model=cfg.model,
            endpoint=cfg.endpoint,
            out=str(cfg.out),
            n_target=cfg.n,
            rows=len(self.rows),
            complete=len(self.rows) >= cfg.n,
            resumed_rows=resumed,
            label_balance=label_balance(self.rows),
            label_balance_generated=generated_balance,
            duplicates_removed=self.stats.duplicates_removed,
            stats=self.stats.model_copy(),
            totals=totals,
            refinement=refinement,
            cost=CostSummary(
                calls=self.stats.calls,
                prompt_tokens=self.stats.prompt_tokens,
                completion_tokens=self.stats.completion_tokens,
                estimated_cost=cost,
            ),
            elapsed_s=round(time.monotonic() - started, 3),
            finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )

    def _write_report(self, report: SynthReport) -> None:
        with contextlib.suppress(OSError):
            self.cfg.report_path.parent.mkdir(parents=True, exist_ok=True)
        self.cfg.report_path.write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")


def format_summary(report: SynthReport) -> str:
    """The cost and quality summary printed at the end of a run."""
    s = report.stats
    lines = [
        f"rows: {report.rows}/{report.n_target} in {report.out} (resumed from {report.resumed_rows}); "
        f"labels: {report.label_balance['unsafe']} unsafe / {report.label_balance['safe']} safe",
        f"calls: {s.calls} ({s.generation_requests} generation, {s.review_requests} review); tokens: "
        f"{s.prompt_tokens} prompt + {s.completion_tokens} completion = {s.prompt_tokens + s.completion_tokens}",
        f"retries: {s.retries} (429: {s.rate_limited}, 5xx: {s.server_errors}, timeouts: {s.timeouts}, "
        f"malformed: {s.malformed}); invalid items dropped: {s.invalid_items}; duplicates removed: "
        f"{s.duplicates_removed} ({s.duplicates_exact} exact, {s.duplicates_near} near)",
    ]
    if report.cost.estimated_cost is not None:
        lines.append(f"estimated cost: {report.cost.estimated_cost:.4f}")
    if report.refinement is not None:
        r = report.refinement
        lines.append(
            f"refinement: {r.reviewed}/{r.sampled} reviewed, {r.relabels} relabelled; refined policy: "
            f"{r.refined_policy or 'none (' + str(r.error) + ')'}"
        )
    lines.append(f"report: {report.out and Path(report.out).with_suffix('.report.json')}")
    return "\n".join(lines)


async def synthesize(
    cfg: SynthConfig,
    embedder: Embedder | None = None,
    *,
    sleep: Sleep = asyncio.sleep,
    transport: httpx.AsyncBaseTransport | None = None,
    log: Callable[[str], None] = print,
) -> SynthReport:
    """Run one ``uniguard synth`` job (the default embedder is MiniLM from its package)."""
    if embedder is None:
        from training.synth_dedup import MiniLMEmbedder

        embedder = await asyncio.to_thread(MiniLMEmbedder.default)
    return await SynthJob(cfg, embedder, sleep=sleep, transport=transport, log=log).run()
