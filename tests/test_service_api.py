"""The HTTP API against the real app (ASGI + lifespan) with the tiny exported model."""

from __future__ import annotations

import asyncio
from pathlib import Path

from export.manifest import Manifest
from policies.registry import PolicyRegistry
from policies.schema import Policy
from service.classifier import registry_threshold
from service.engine import OnnxEngine
from service.schemas import ClassifyResponse, ErrorResponse, PolicyInfo, PolicyList
from tests.service_support import GatedFactory, make_settings, running_app

REGISTRY = PolicyRegistry.load()
DEFAULTS = [p.name for p in REGISTRY.defaults()]
INLINE = {
    "name": "competitor_mentions",
    "description": "Flags prompts that ask about competitor products or prices.",
    "disallowed": ["asking which competitor product is better", "asking for competitor prices"],
    "allowed": ["questions about our own products"],
}


def _error(body: dict, code: str) -> ErrorResponse:
    err = ErrorResponse.model_validate(body)
    assert err.error.code == code, body
    return err


async def test_classify_response_schema_and_defaults(tiny_model_dir: Path, tiny_engine: OnnxEngine) -> None:
    async with running_app(make_settings(tiny_model_dir), lambda s: tiny_engine) as (_app, client):
        r = await client.post("/classify", json={"input": ["hello there", "how do I file my taxes?"]})
        assert r.status_code == 200, r.text
        body = ClassifyResponse.model_validate(r.json())
        assert set(r.json()) == {
            "id",
            "model",
            "results",
            "usage",
            "latency_ms",
            "fail_mode",
            "degraded",
            "degraded_reason",
        }
        assert body.model == tiny_engine.model_id
        assert len(body.results) == 2
        assert body.usage.texts == 2 and body.usage.policies == len(DEFAULTS) and body.usage.tokens > 0
        for text, result in zip(["hello there", "how do I file my taxes?"], body.results, strict=True):
            assert list(result.policies) == DEFAULTS
            expected = tiny_engine.score_pairs([(REGISTRY[n].instruction_text(), text) for n in DEFAULTS])
            for (name, verdict), exp in zip(result.policies.items(), expected, strict=True):
                assert abs(verdict.score - exp.score) < 1e-5
                assert verdict.verdict == ("unsafe" if verdict.score >= verdict.threshold else "safe"), name
                assert verdict.cached is False and verdict.span is None
            assert result.flagged == any(v.verdict == "unsafe" for v in result.policies.values())
        schema = (await client.get("/openapi.json")).json()
        assert "/classify" in schema["paths"] and "ClassifyResponse" in schema["components"]["schemas"]
        assert schema["components"]["schemas"]["ClassifyRequest"].get("examples")


async def test_inline_custom_policy_is_judged_zero_shot(tiny_model_dir: Path, tiny_engine: OnnxEngine) -> None:
    async with running_app(make_settings(tiny_model_dir), lambda s: tiny_engine) as (_app, client):
        r = await client.post(
            "/classify",
            json={"input": "is their product cheaper?", "policies": ["toxicity"], "custom_policies": [INLINE]},
        )
        assert r.status_code == 200, r.text
        verdict = r.json()["results"][0]["policies"]["competitor_mentions"]
        policy = Policy(**INLINE)
        (expected,) = tiny_engine.score_pairs([(policy.instruction_text(), "is their product cheaper?")])
        assert abs(verdict["score"] - expected.score) < 1e-5
        assert verdict["threshold"] == tiny_engine.manifest.default_threshold
        # never stored: the registry is unchanged
        assert "competitor_mentions" not in [p["name"] for p in (await client.get("/policies")).json()["policies"]]
        # only inline policies: the defaults are not added
        r = await client.post("/classify", json={"input": "hi", "custom_policies": [{**INLINE, "threshold": 0.0}]})
        assert list(r.json()["results"][0]["policies"]) == ["competitor_mentions"]
        assert r.json()["results"][0]["flagged"] is True
        # the registry's schema rules apply
        bad = {**INLINE, "name": "Bad Name"}
        r = await client.post("/classify", json={"input": "hi", "custom_policies": [bad]})
        assert r.status_code == 422 and _error(r.json(), "invalid_request").error.field == "custom_policies.0.name"
        r = await client.post("/classify", json={"input": "hi", "custom_policies": [{**INLINE, "disallowed": []}]})
        assert r.status_code == 422 and "disallowed" in (r.json()["error"]["field"] or "")
        r = await client.post("/classify", json={"input": "hi", "custom_policies": [{**INLINE, "name": "toxicity"}]})
        assert r.status_code == 422 and _error(r.json(), "duplicate_policy")


async def test_thresholds_override_and_validation(tiny_model_dir: Path, tiny_engine: OnnxEngine) -> None:
    async with running_app(make_settings(tiny_model_dir), lambda s: tiny_engine) as (_app, client):
        req = {"input": "hello", "policies": ["toxicity", "tax_advice"]}
        base = (await client.post("/classify", json=req)).json()["results"][0]["policies"]
        score = base["toxicity"]["score"]
        low = (await client.post("/classify", json={**req, "thresholds": {"toxicity": score}})).json()
        assert low["results"][0]["policies"]["toxicity"] == {
            **base["toxicity"],
            "verdict": "unsafe",
            "threshold": score,
            "cached": True,
        }
        assert low["results"][0]["flagged"] is True
        high = (await client.post("/classify", json={**req, "thresholds": {"toxicity": score + 1e-6}})).json()
        assert high["results"][0]["policies"]["toxicity"]["verdict"] == "safe"
        assert high["results"][0]["policies"]["tax_advice"]["threshold"] == base["tax_advice"]["threshold"]
        r = await client.post("/classify", json={**req, "thresholds": {"toxicity": 1.5}})
        assert r.status_code == 422 and r.json()["error"]["field"] == "thresholds.toxicity"
        r = await client.post("/classify", json={**req, "thresholds": {"content_safety": 0.2}})
        assert r.status_code == 422 and _error(r.json(), "unknown_policy").error.field == "thresholds.content_safety"


def test_threshold_precedence(tiny_engine: OnnxEngine) -> None:
    tox = REGISTRY["toxicity"]
    manifest: Manifest = tiny_engine.manifest.model_copy(
        update={"thresholds": {**tiny_engine.manifest.thresholds, "toxicity": 0.37}, "default_threshold": 0.61}
    )
    assert registry_threshold(tox, manifest) == 0.37  # calibrated for this exact policy text
    edited = tox.model_copy(update={"description": tox.description + " Edited."})
    assert registry_threshold(edited, manifest) == tox.threshold  # text changed: the YAML's explicit threshold
    implicit = Policy(name="toxicity", description=edited.description, disallowed=tox.disallowed)
    assert registry_threshold(implicit, manifest) == 0.61  # nothing explicit: the model's default


async def test_long_text_reports_the_best_span(tiny_model_dir: Path, tiny_engine: OnnxEngine) -> None:
    text = " ".join(f"line {i}: the quarterly report is due on friday." for i in range(60))
    async with running_app(make_settings(tiny_model_dir), lambda s: tiny_engine) as (_app, client):
        r = await client.post("/classify", json={"input": text, "policies": ["toxicity"]})
        verdict = r.json()["results"][0]["policies"]["toxicity"]
    (expected,) = tiny_engine.score_pairs([(REGISTRY["toxicity"].instruction_text(), text)])
    assert expected.windows > 1
    assert abs(verdict["score"] - expected.score) < 1e-5
    assert verdict["span"] == {"start": expected.char_start, "end": expected.char_end}
    assert (verdict["span"]["start"], verdict["span"]["end"]) != (0, len(text))


async def test_bad_requests_get_json_errors(tiny_model_dir: Path, tiny_engine: OnnxEngine) -> None:
    settings = make_settings(tiny_model_dir, max_texts_per_request=3, max_text_chars=100, max_body_bytes=2048)
    async with running_app(settings, lambda s: tiny_engine) as (_app, client):
        cases = [
            ({"input": "hi", "policies": ["toxicity", "no_such_policy"]}, 422, "unknown_policy", "policies"),
            ({"input": []}, 422, "empty_input", "input"),
            ({"input": ["ok", "  "]}, 422, "empty_text", "input.1"),
            ({"input": ["a", "b", "c", "d"]}, 422, "too_many_texts", "input"),
            ({"input": "x" * 101}, 422, "text_too_long", "input.0"),
            ({"input": 5}, 422, "invalid_request", None),
            ({"text": "hi"}, 422, "invalid_request", None),
        ]
        for body, status, code, field in cases:
            r = await client.post("/classify", json=body)
            assert r.status_code == status, (body, r.text)
            err = _error(r.json(), code)
            if field:
                assert err.error.field == field, (body, r.text)
        r = await client.post("/classify", json={"input": "hi", "policies": ["nope"]})
        assert "'nope'" in r.json()["error"]["message"]
        r = await client.post("/classify", content=b'{"input": ', headers={"content-type": "application/json"})
        assert r.status_code == 400 and _error(r.json(), "invalid_json")
        r = await client.post("/classify", json={"input": "y" * 3000})
        assert r.status_code == 413 and _error(r.json(), "payload_too_large")
        r = await client.get("/policies/nope")
        assert r.status_code == 404 and _error(r.json(), "unknown_policy")
        r = await client.get("/no/such/route")
        assert r.status_code == 404 and _error(r.json(), "not_found")


async def test_policies_endpoints(tiny_model_dir: Path, tiny_engine: OnnxEngine) -> None:
    async with running_app(make_settings(tiny_model_dir), lambda s: tiny_engine) as (_app, client):
        listing = PolicyList.model_validate((await client.get("/policies")).json())
        assert [p.name for p in listing.policies] == REGISTRY.names
        one = PolicyInfo.model_validate((await client.get("/policies/toxicity")).json())
        tox = REGISTRY["toxicity"]
        assert one.version == tox.content_hash and one.disallowed == tox.disallowed and one.known_to_model
        assert one.threshold == tiny_engine.manifest.thresholds["toxicity"]
        version = (await client.get("/version")).json()
        assert version["model"] == tiny_engine.model_id and version["provider"] == "cpu"


async def test_readyz_only_after_load_and_warmup(tiny_model_dir: Path, tiny_engine: OnnxEngine) -> None:
    gated = GatedFactory(tiny_engine)
    async with running_app(make_settings(tiny_model_dir), gated, wait_ready=False) as (app, client):
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        r = await client.get("/readyz")
        assert r.status_code == 503 and _error(r.json(), "not_ready")
        r = await client.post("/classify", json={"input": "hi"})
        assert r.status_code == 503 and "results" not in r.json() and _error(r.json(), "not_ready")
        gated.release()
        await asyncio.wait_for(asyncio.shield(app.state.loader), 30)
        r = await client.get("/readyz")
        assert r.status_code == 200 and r.json()["ready"] is True
        assert (await client.post("/classify", json={"input": "hi"})).status_code == 200


async def test_missing_model_folder_starts_but_is_not_ready(tmp_path: Path) -> None:
    async with running_app(make_settings(tmp_path / "no-model")) as (_app, client):
        assert (await client.get("/healthz")).status_code == 200
        r = await client.get("/readyz")
        assert r.status_code == 503
        message = _error(r.json(), "model_unavailable").error.message
        assert "make model" in message and "UNIGUARD_MODEL_DIR" in message and "no-model" in message
        r = await client.post("/classify", json={"input": "hi"})
        assert r.status_code == 503 and "results" not in r.json() and _error(r.json(), "model_unavailable")
        assert (await client.get("/policies")).status_code == 200


async def test_metrics_exposed(tiny_model_dir: Path, tiny_engine: OnnxEngine) -> None:
    async with running_app(make_settings(tiny_model_dir), lambda s: tiny_engine) as (_app, client):
        await client.post("/classify", json={"input": "hello", "custom_policies": [INLINE]})
        await client.post("/classify", json={"input": "hello", "custom_policies": [INLINE]})
        r = await client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.text
        for name in (
            'uniguard_requests_total{endpoint="/classify",method="POST",status="200"} 2.0',
            "uniguard_request_duration_seconds_bucket",
            "uniguard_queue_wait_seconds_bucket",
            "uniguard_tokenize_seconds_bucket",
            "uniguard_inference_seconds_bucket",
            "uniguard_batch_size_bucket",
            "uniguard_batch_tokens_bucket",
            "uniguard_queue_depth",
            'uniguard_cache_hits_total{backend="memory"} 1.0',
            'uniguard_cache_misses_total{backend="memory"} 1.0',
            'uniguard_verdicts_total{policy="custom"',
            f'uniguard_model_info{{model="{tiny_engine.model_id}"',
            "uniguard_ready 1.0",
        ):
            assert name in text, name
        assert "competitor_mentions" not in text  # inline names never become label values
