"""Bad input: every malformed request gets a 4xx with the JSON error envelope naming the offending field."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from service.engine import OnnxEngine
from service.schemas import ErrorResponse
from tests.service_support import make_settings, running_app

INLINE = {
    "name": "competitor_mentions",
    "description": "Flags prompts that ask about competitor products or prices.",
    "disallowed": ["asking which competitor product is better"],
}
LIMITS = {
    "max_texts_per_request": 3,
    "max_policies_per_request": 2,
    "max_custom_policies": 1,
    "max_text_chars": 100,
    "max_body_bytes": 4096,
}


def _check_error(r: httpx.Response, status: int, code: str, field: str | None = None) -> ErrorResponse:
    assert r.status_code == status, (status, code, r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    assert set(r.json()) == {"error"} and set(r.json()["error"]) == {"code", "message", "field"}, r.text
    err = ErrorResponse.model_validate(r.json())
    assert err.error.code == code, r.text
    assert err.error.message
    if field is not None:
        assert err.error.field == field, r.text
    assert "results" not in r.text
    return err


JSON_CASES: list[tuple[str, Any, int, str, str | None]] = [
    ("wrong type of input", {"input": 5}, 422, "invalid_request", "input"),
    ("list of numbers as input", {"input": ["ok", 7]}, 422, "invalid_request", "input.1"),
    (
        "boolean threshold",
        {"input": "hi", "thresholds": {"toxicity": True}},
        422,
        "invalid_request",
        "thresholds.toxicity",
    ),
    (
        "string threshold",
        {"input": "hi", "thresholds": {"toxicity": "0.5"}},
        422,
        "invalid_request",
        "thresholds.toxicity",
    ),
    (
        "boolean inline threshold",
        {"input": "hi", "custom_policies": [{**INLINE, "threshold": True}]},
        422,
        "invalid_request",
        "custom_policies.0.threshold",
    ),
    ("not an object", ["hi"], 422, "invalid_request", None),
    ("wrong type of policies", {"input": "hi", "policies": "toxicity"}, 422, "invalid_request", "policies"),
    ("unknown field", {"input": "hi", "text": "hi"}, 422, "invalid_request", "text"),
    ("missing input", {"policies": ["toxicity"]}, 422, "invalid_request", "input"),
    ("empty input list", {"input": []}, 422, "empty_input", "input"),
    ("empty string", {"input": ""}, 422, "empty_text", "input.0"),
    ("whitespace-only string", {"input": ["fine", " \n\t "]}, 422, "empty_text", "input.1"),
    ("unpaired surrogate", {"input": ["ok", "bad \ud800 text"]}, 422, "invalid_text", "input.1"),
    ("unknown policy", {"input": "hi", "policies": ["toxicity", "nope_x"]}, 422, "unknown_policy", "policies"),
    ("duplicate policy", {"input": "hi", "policies": ["toxicity", "toxicity"]}, 422, "duplicate_policy", "policies"),
    (
        "invalid inline policy name",
        {"input": "hi", "custom_policies": [{**INLINE, "name": "Bad Name"}]},
        422,
        "invalid_request",
        "custom_policies.0.name",
    ),
    (
        "inline policy without disallowed",
        {"input": "hi", "custom_policies": [{**INLINE, "disallowed": []}]},
        422,
        "invalid_request",
        "custom_policies.0.disallowed",
    ),
    (
        "inline policy threshold out of range",
        {"input": "hi", "custom_policies": [{**INLINE, "threshold": 2}]},
        422,
        "invalid_request",
        "custom_policies.0.threshold",
    ),
    (
        "too many inline policies",
        {"input": "hi", "custom_policies": [INLINE, {**INLINE, "name": "other_one"}]},
        422,
        "too_many_custom_policies",
        "custom_policies",
    ),
    (
        "threshold above 1",
        {"input": "hi", "policies": ["toxicity"], "thresholds": {"toxicity": 1.01}},
        422,
        "invalid_threshold",
        "thresholds.toxicity",
    ),
    (
        "threshold below 0",
        {"input": "hi", "policies": ["toxicity"], "thresholds": {"toxicity": -0.1}},
        422,
        "invalid_threshold",
        "thresholds.toxicity",
    ),
    (
        "threshold for a policy not applied",
        {"input": "hi", "policies": ["toxicity"], "thresholds": {"tax_advice": 0.3}},
        422,
        "unknown_policy",
        "thresholds.tax_advice",
    ),
    (
        "too many policies",
        {"input": "hi", "policies": ["toxicity", "tax_advice", "prompt_injection"]},
        422,
        "too_many_policies",
        "policies",
    ),
    ("too many texts", {"input": ["a", "b", "c", "d"]}, 422, "too_many_texts", "input"),
    ("text over the character limit", {"input": ["ok", "x" * 101]}, 422, "text_too_long", "input.1"),
    (
        "fail_mode open on a fail-closed server",
        {"input": "hi", "fail_mode": "open"},
        422,
        "fail_open_not_allowed",
        None,
    ),
    ("fail_mode not a mode", {"input": "hi", "fail_mode": "maybe"}, 422, "invalid_request", "fail_mode"),
]


async def test_malformed_json_requests(tiny_model_dir: Path, tiny_engine: OnnxEngine) -> None:
    async with running_app(make_settings(tiny_model_dir, **LIMITS), lambda s: tiny_engine) as (_app, client):
        for label, body, status, code, field in JSON_CASES:
            # json.dumps escapes non-ASCII, so an unpaired surrogate travels as the JSON escape "\\ud800"
            r = await client.post("/classify", content=json.dumps(body), headers={"content-type": "application/json"})
            err = _check_error(r, status, code, field)
            assert "\ud800" not in err.error.message, label
            # plain words: no validator internals in the message
            for internal in ("Value error", "list[str]", "input.str", "Input should", "float_type"):
                assert internal not in err.error.message, (label, err.error.message)
        # the messages say what is wrong in plain words, naming the field
        messages = {}
        for body in ({"input": 5}, {"input": "hi", "thresholds": {"toxicity": "0.5"}}, {"input": "hi", "extra": 1}):
            r = await client.post("/classify", json=body)
            messages[json.dumps(body)] = r.json()["error"]["message"]
        assert list(messages.values()) == [
            "input must be a string or a list of strings",
            "thresholds must map policy names to numbers between 0 and 1 (not strings or booleans)",
            "extra is not a request field; the fields are input, policies, custom_policies, thresholds, fail_mode",
        ], messages
        # deeply nested JSON is a documented 400, not an undocumented code
        nested = "[" * 1900 + "]" * 1900
        r = await client.post(
            "/classify", content='{"input": ' + nested + "}", headers={"content-type": "application/json"}
        )
        assert r.status_code in (400, 422) and r.json()["error"]["code"] in ("invalid_json", "invalid_request"), r.text
        # the limits are what the settings say: one under each limit passes
        ok = {"input": ["a", "b", "x" * 100], "policies": ["toxicity"], "custom_policies": [INLINE]}
        assert (await client.post("/classify", json=ok)).status_code == 200
        # a threshold exactly at the ends of [0, 1] is valid
        edge = {"input": "hi", "policies": ["toxicity", "tax_advice"], "thresholds": {"toxicity": 0, "tax_advice": 1}}
        assert (await client.post("/classify", json=edge)).status_code == 200


async def test_malformed_bodies_and_content_types(tiny_model_dir: Path, tiny_engine: OnnxEngine) -> None:
    async with running_app(make_settings(tiny_model_dir, **LIMITS), lambda s: tiny_engine) as (_app, client):
        json_header = {"content-type": "application/json"}
        _check_error(await client.post("/classify", content=b'{"input": ', headers=json_header), 400, "invalid_json")
        _check_error(await client.post("/classify", content=b"[1, 2", headers=json_header), 400, "invalid_json")
        bad_utf8 = b'{"input": "caf\xe9 \xff"}'
        _check_error(await client.post("/classify", content=bad_utf8, headers=json_header), 400, "invalid_utf8")
        truncated = b'{"input": "ok"}\xe2\x82'  # a multi-byte sequence cut at the end of the body
        _check_error(await client.post("/classify", content=truncated, headers=json_header), 400, "invalid_utf8")
        body = b'{"input": "hello", "policies": ["toxicity"]}'
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1"):
            r = await client.post("/classify", content=body, headers={"content-type": content_type})
            _check_error(r, 415, "unsupported_media_type", "content-type")
        r = await client.post("/classify", content=body)  # no content type at all
        _check_error(r, 415, "unsupported_media_type", "content-type")
        for content_type in ("application/json; charset=utf-8", "Application/JSON", "application/merge-patch+json"):
            r = await client.post("/classify", content=body, headers={"content-type": content_type})
            assert r.status_code == 200, (content_type, r.text)
        # the body-size limit: declared length over the limit is refused before any byte is read
        r = await client.post("/classify", json={"input": "y" * 5000})
        _check_error(r, 413, "payload_too_large")
        assert "UNIGUARD_MAX_BODY_BYTES" in r.json()["error"]["message"]
        r = await client.get("/policies/nope")
        _check_error(r, 404, "unknown_policy", "name")
        _check_error(await client.get("/no/such/route"), 404, "not_found")
        _check_error(await client.delete("/classify"), 405, "method_not_allowed")


async def test_body_limit_is_enforced_while_streaming(tiny_model_dir: Path, tiny_engine: OnnxEngine) -> None:
    """A chunked body with no Content-Length is cut off as soon as it passes the limit, not after reading it all."""
    sent = {"chunks": 0}

    async def body() -> AsyncIterator[bytes]:
        yield b'{"input": "'
        for _ in range(1000):  # 1 MB in 1 KB chunks
            sent["chunks"] += 1
            yield b"z" * 1024
        yield b'"}'

    async with running_app(make_settings(tiny_model_dir, **LIMITS), lambda s: tiny_engine) as (_app, client):
        r = await client.post("/classify", content=body(), headers={"content-type": "application/json"})
        _check_error(r, 413, "payload_too_large")
        assert "content-length" not in {k.lower() for k in r.request.headers}
        assert sent["chunks"] <= 5, f"{sent['chunks']} chunks read: the body was buffered past the 4 KB limit"

        # invalid UTF-8 in a later chunk of a streamed body is found as it arrives
        async def bad() -> AsyncIterator[bytes]:
            yield b'{"input": "'
            yield b"ok \xc3"  # a sequence split across chunks is fine ...
            yield b"\xa9 then \xff"  # ... a byte that can never start a sequence is not
            yield b'"}'

        r = await client.post("/classify", content=bad(), headers={"content-type": "application/json"})
        _check_error(r, 400, "invalid_utf8")

        async def split() -> AsyncIterator[bytes]:
            for piece in (b'{"policies": ["toxicity"], "input": "caf', b"\xc3", b'\xa9 ok"}'):
                yield piece

        r = await client.post("/classify", content=split(), headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
