"""``uniguard synth`` end to end against a real local chat-completions server (tests/stub_llm.py)."""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from pathlib import Path

import numpy as np
import pytest

from policies.registry import DEFAULT_POLICY_DIR, load_policy_file
from tests.stub_llm import DUPLICATES, MISLABELED, REFINED, SERVED_SAFE, SERVED_UNSAFE, TRUTH, StubLLM
from training.synth import (
    SynthConfig,
    SynthError,
    SynthReport,
    SynthRow,
    backoff_delay,
    parse_retry_after,
    synthesize,
)
from training.synth_dedup import Deduper, MiniLMEmbedder, normalize_text
from training.synth_prompts import MalformedAnswer, generation_messages, parse_generation
from uniguard.cli import main

POLICY = DEFAULT_POLICY_DIR / "financial_advice.yaml"
KEY_ENV = "UNIGUARD_TEST_SYNTH_KEY"


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    return MiniLMEmbedder.default()


def _config(stub: StubLLM, out: Path, **overrides: object) -> SynthConfig:
    values: dict[str, object] = {
        "policy_file": POLICY,
        "out": out,
        "n": 20,
        "endpoint": stub.base_url,
        "model": "stub-model",
        "api_key_env": KEY_ENV,
        "concurrency": 2,
        "batch_size": 6,
        "refine_sample": 1.0,
        "backoff_base_s": 0.0,
        "timeout_s": 10.0,
        "progress": False,
    }
    values.update(overrides)
    return SynthConfig.model_validate(values)


def _rows(path: Path) -> list[SynthRow]:
    return [SynthRow.model_validate_json(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _assert_no_duplicates(rows: list[SynthRow], embedder: MiniLMEmbedder, threshold: float = 0.92) -> None:
    keys = [normalize_text(r.text) for r in rows]
    assert len(set(keys)) == len(keys), "exact duplicates in the output"
    emb = embedder.encode([r.text for r in rows])
    sims = emb @ emb.T
    np.fill_diagonal(sims, 0.0)
    assert float(sims.max()) <= threshold, "near duplicates in the output"


async def test_full_run_rows_balance_dedup_refinement_and_faults(
    tmp_path: Path, embedder: MiniLMEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "test-key")
    out = tmp_path / "financial_advice.synth.jsonl"
    faults = {2: "malformed", 3: "429", 5: "500", 6: "fenced", 7: "slow"}
    with StubLLM(faults=faults, retry_after="1", slow_s=2.0, invalid_rewrite_first=True) as stub:
        report = await synthesize(_config(stub, out, timeout_s=1.0), embedder, log=lambda _: None)

    rows = _rows(out)
    # rows: the shared format plus rationale, exactly n of them, generated balanced
    assert len(rows) == 20 and report.rows == 20 and report.complete
    for row in rows:
        assert row.policy == "financial_advice" and row.source == "synth:stub-model" and row.license == "synthetic"
        assert row.rationale and row.lang in {"en", "de", "es", "fr"}
        assert (row.category is None) == (row.text in MISLABELED)  # relabelled rows lose the generator's category
    assert report.label_balance_generated == {"safe": 10, "unsafe": 10}
    # dedup: the stub's injected exact and near duplicates were removed
    _assert_no_duplicates(rows, embedder)
    assert report.stats.duplicates_exact >= 1 and report.stats.duplicates_near >= 1
    texts = {r.text for r in rows}
    originals = {t for t, _ in SERVED_UNSAFE[:2] + SERVED_SAFE[:2]}
    assert len(originals & texts) + len({d for d, _, _ in DUPLICATES} & texts) <= 4  # one of each pair at most
    # invalid items: one per successful generation answer, all dropped
    assert report.stats.invalid_items == report.stats.generation_requests >= 4
    # faults: counted, retried, Retry-After honoured
    assert report.stats.malformed == 2  # the truncated answer and the invalid policy proposal
    assert report.stats.rate_limited == 1 == stub.count(status=429)
    assert report.stats.server_errors == 1 == stub.count(status=500)
    assert report.stats.timeouts == 1
    assert report.stats.retries == 5
    assert report.stats.calls == len(stub.calls)
    assert (report.stats.prompt_tokens, report.stats.completion_tokens) == stub.tokens
    limited = next(c for c in stub.calls if c.status == 429)
    retried = next(c for c in stub.calls if c.body_hash == limited.body_hash and c.number > limited.number)
    assert retried.time - limited.time >= 0.95, "Retry-After: 1 was not honoured"
    assert {c.authorization for c in stub.calls} == {"Bearer test-key"}
    assert {c.model for c in stub.calls} == {"stub-model"}
    # refinement: every mislabelled item that made it into the data was corrected
    mislabeled_in = MISLABELED & texts
    assert len(mislabeled_in) >= 2
    assert report.refinement is not None
    assert report.refinement.sampled == report.refinement.reviewed == 20
    assert report.refinement.relabels == len(mislabeled_in)
    for row in rows:
        assert row.label == TRUTH[row.text]
        if row.text in mislabeled_in:
            assert "relabelled" in row.rationale
    assert report.label_balance == {
        "safe": sum(TRUTH[t] == "safe" for t in texts),
        "unsafe": sum(TRUTH[t] == "unsafe" for t in texts),
    }
    refined = load_policy_file(out.with_suffix(".refined_policy.yaml"))
    assert refined.name == "financial_advice" and refined.version == "1-refined"
    assert refined.description == REFINED["description"] and refined.disallowed == REFINED["disallowed"]
    assert {ex.text for ex in refined.examples} >= mislabeled_in
    on_disk = SynthReport.model_validate_json(out.with_suffix(".report.json").read_text())
    assert on_disk.stats == report.stats and on_disk.refinement == report.refinement


async def test_resume_after_crash_continues_without_duplicates(
    tmp_path: Path, embedder: MiniLMEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "test-key")
    out = tmp_path / "resume.jsonl"
    settings = {"n": 16, "batch_size": 4, "concurrency": 1, "max_retries": 1, "refine_sample": 0.5}
    with StubLLM(fail_after=3) as crashing, pytest.raises(SynthError, match="rerun the same command"):
        await synthesize(_config(crashing, out, **settings), embedder, log=lambda _: None)
    first = _rows(out)
    assert 0 < len(first) < 16
    crashed = SynthReport.model_validate_json(out.with_suffix(".report.json").read_text())
    assert not crashed.complete and crashed.rows == len(first) and crashed.stats.server_errors == 2
    with out.open("a", encoding="utf-8") as handle:
        handle.write('{"text": "a torn li')  # the process died mid-write

    with StubLLM() as fresh:  # starts again at the beginning of its pool: everything served first is a duplicate
        report = await synthesize(_config(fresh, out, **settings), embedder, log=lambda _: None)
    rows = _rows(out)
    assert len(rows) == 16 and report.complete and report.resumed_rows == len(first)
    assert [r.text for r in rows[: len(first)]] == [r.text for r in first]
    _assert_no_duplicates(rows, embedder)
    assert report.stats.duplicates_exact >= 4  # the fresh stub's first batch repeats rows already in the file
    assert report.label_balance_generated == {"safe": 8, "unsafe": 8}
    assert report.totals.calls == crashed.stats.calls + report.stats.calls
    assert report.refinement is not None and report.refinement.sampled == 8

    with StubLLM() as idle:  # complete and refined: a rerun makes no calls
        again = await synthesize(_config(idle, out, **settings), embedder, log=lambda _: None)
    assert idle.calls == [] and again.rows == 16 and len(_rows(out)) == 16


async def test_cancelled_run_keeps_its_rows_and_resumes(
    tmp_path: Path, embedder: MiniLMEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "test-key")
    out = tmp_path / "cancel.jsonl"
    settings = {"n": 12, "batch_size": 4, "concurrency": 1, "refine_sample": 0.0}
    with StubLLM(faults={3: "slow"}, slow_s=1.5) as stub:
        task = asyncio.create_task(synthesize(_config(stub, out, **settings), embedder, log=lambda _: None))
        while len(stub.calls) < 3:  # the third call hangs: cancel the run there (like Ctrl-C)
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    first = _rows(out)
    assert 0 < len(first) < 12
    assert not SynthReport.model_validate_json(out.with_suffix(".report.json").read_text()).complete
    with StubLLM() as fresh:
        report = await synthesize(_config(fresh, out, **settings), embedder, log=lambda _: None)
    rows = _rows(out)
    assert len(rows) == 12 and report.resumed_rows == len(first)
    _assert_no_duplicates(rows, embedder)


async def test_dedup_against_existing_file(
    tmp_path: Path, embedder: MiniLMEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "test-key")
    existing = tmp_path / "existing.jsonl"
    known = [SERVED_UNSAFE[0][0], "How does compound interest actually work?", "Tell me a joke about cats."]
    existing.write_text("".join(json.dumps({"text": t, "label": "safe"}) + "\n" for t in known))
    out = tmp_path / "against.jsonl"
    with StubLLM() as stub:
        report = await synthesize(
            _config(stub, out, n=10, refine_sample=0.0, against=[existing]), embedder, log=lambda _: None
        )
    texts = {r.text for r in _rows(out)}
    assert len(texts) == 10
    assert SERVED_UNSAFE[0][0] not in texts  # exact duplicate of the existing file
    assert SERVED_SAFE[1][0] not in texts  # near duplicate of the existing file
    assert report.stats.duplicates_near >= 1 and report.stats.duplicates_exact >= 1
    assert report.refinement is None and not out.with_suffix(".refined_policy.yaml").exists()


def test_cli_prints_cost_summary(
    tmp_path: Path, embedder: MiniLMEmbedder, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MY_KEY", "cli-key")
    out = tmp_path / "cli.jsonl"
    with StubLLM() as stub:
        code = main(
            [
                "synth",
                "--policy",
                str(POLICY),
                "--n",
                "8",
                "--out",
                str(out),
                "--endpoint",
                stub.base_url,
                "--model",
                "stub-model",
                "--api-key-env",
                "MY_KEY",
                "--batch-size",
                "4",
                "--concurrency",
                "2",
                "--refine-sample",
                "0.5",
                "--price-per-1k",
                "0.5",
                "--backoff-base",
                "0",
                "--no-progress",
            ]
        )
    assert code == 0
    printed = capsys.readouterr().out
    report = SynthReport.model_validate_json(out.with_suffix(".report.json").read_text())
    prompt, completion = stub.tokens
    assert report.cost.estimated_cost == pytest.approx((prompt + completion) * 0.5 / 1000)
    assert f"calls: {len(stub.calls)}" in printed and f"{prompt} prompt + {completion} completion" in printed
    assert "estimated cost:" in printed and "rows: 8/8" in printed
    assert {c.authorization for c in stub.calls} == {"Bearer cli-key"}
    assert len(_rows(out)) == 8 and out.with_suffix(".refined_policy.yaml").is_file()


def test_cli_names_the_key_variable_on_401(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with StubLLM(faults={1: "401"}) as stub:
        code = main(
            [
                "synth",
                "--policy",
                str(POLICY),
                "--n",
                "4",
                "--out",
                str(tmp_path / "x.jsonl"),
                "--endpoint",
                stub.base_url,
                "--model",
                "m",
                "--concurrency",
                "1",
                "--no-progress",
            ]
        )
    assert code == 1
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "--api-key-env" in err
    assert len(stub.calls) == 1  # not retried


def test_parse_generation_is_strict() -> None:
    good = {"text": "Should I buy Tesla?", "label": "unsafe", "category": "x", "lang": "en", "rationale": "advice"}
    bad = [
        {**good, "label": "Unsafe"},
        {**good, "label": 1},
        {k: v for k, v in good.items() if k != "rationale"},
        {**good, "text": ""},
        {**good, "lang": "English"},
        "just a string",
    ]
    items, invalid = parse_generation(json.dumps({"items": [good, *bad]}))
    assert [i.text for i in items] == ["Should I buy Tesla?"] and invalid == len(bad)
    fenced, _ = parse_generation("```json\n" + json.dumps({"items": [good]}) + "\n```")
    assert len(fenced) == 1
    for broken in ['{"items": [', "[]", '{"rows": []}', "", None]:
        with pytest.raises(MalformedAnswer):
            parse_generation(broken)


def test_generation_prompt_states_the_policy_counts_and_hard_cases() -> None:
    policy = load_policy_file(POLICY)
    messages = generation_messages(policy, 3, 4, "For this batch: write as a student.", ["an earlier prompt"])
    prompt = messages[-1]["content"]
    assert "exactly 3 unsafe and 4 safe" in prompt and "hard negatives" in prompt
    assert policy.description in prompt and all(item in prompt for item in policy.disallowed + policy.allowed)
    assert policy.examples[0].text in prompt and "an earlier prompt" in prompt and '{"items": [' in prompt


def test_retry_after_and_backoff() -> None:
    assert parse_retry_after("2") == 2.0 and parse_retry_after(None) is None and parse_retry_after("soon") is None
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= (parse_retry_after(future) or 0) <= 31
    rng = random.Random(0)
    assert backoff_delay(0, 0.0, 60, rng, retry_after=1.5) == 1.5
    delays = [backoff_delay(3, 1.0, 60, rng) for _ in range(50)]
    assert all(4.0 <= d <= 8.0 for d in delays) and len(set(delays)) > 1  # exponential, jittered
    assert backoff_delay(20, 1.0, 60, rng) <= 60


def test_deduper_exact_and_near(embedder: MiniLMEmbedder) -> None:
    deduper = Deduper(embedder, threshold=0.92)
    kinds = deduper.filter(
        [
            "Should I put my $20,000 savings into Tesla or Nvidia right now?",
            "should i put my $20,000 savings into tesla or nvidia right now",
            "Should I put all my $20,000 savings into Tesla or Nvidia right now?",
            "What is the difference between a stock and a bond?",
        ]
    )
    assert kinds == [None, "exact", "near", None]
    assert len(deduper) == 2
