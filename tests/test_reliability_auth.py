"""Optional API keys: Bearer keys checked against sha256 hashes in constant time; probes open by default."""

from __future__ import annotations

import hmac
from pathlib import Path

import pytest

from service import security
from service.config import SettingsError, load_settings
from service.engine import OnnxEngine
from service.security import bearer_token, hash_key, key_matches
from tests.service_support import make_settings, running_app

KEY, OTHER_KEY = "uk-test-7f3a9c", "uk-second-key-41"
BODY = {"input": "hello", "policies": ["toxicity"]}


async def test_keys_required_when_configured(tiny_model_dir: Path, tiny_engine: OnnxEngine) -> None:
    settings = make_settings(
        tiny_model_dir, api_key_hashes=[hash_key(KEY), hash_key(OTHER_KEY).upper()], admin_enabled=True
    )
    async with running_app(settings, lambda s: tiny_engine) as (_app, client):
        for headers in (
            {},
            {"authorization": "Bearer wrong-key"},
            {"authorization": f"Basic {KEY}"},
            {"authorization": "Bearer "},
            {"authorization": hash_key(KEY)},  # the hash itself is not a key
            {"authorization": f"Bearer {hash_key(KEY)}"},
        ):
            r = await client.post("/classify", json=BODY, headers=headers)
            assert r.status_code == 401, (headers, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert r.json()["error"]["code"] == "unauthorized" and "results" not in r.json()
        for key in (KEY, OTHER_KEY):
            r = await client.post("/classify", json=BODY, headers={"authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
        assert (await client.post("/classify", json=BODY, headers={"authorization": f"bearer  {KEY} "})).is_success
        # every other endpoint needs the key too, even unknown routes (no route enumeration without a key)
        for method, path in (
            ("GET", "/policies"),
            ("GET", "/policies/toxicity"),
            ("GET", "/version"),
            ("GET", "/openapi.json"),
            ("GET", "/docs"),
            ("GET", "/no/such/route"),
            ("POST", "/admin/reload-policies"),
        ):
            assert (await client.request(method, path)).status_code == 401, path
            authed = await client.request(method, path, headers={"authorization": f"Bearer {KEY}"})
            assert authed.status_code in (200, 404), (path, authed.text)
        # probes stay open by default
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await client.get(path)).status_code == 200, path
        metrics = (await client.get("/metrics")).text
        assert "uniguard_auth_failures_total 13.0" in metrics
        schema = (await client.get("/openapi.json", headers={"authorization": f"Bearer {KEY}"})).json()
        assert schema["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
        assert schema["paths"]["/classify"]["post"]["security"] == [{"apiKey": []}]
        assert "security" not in schema["paths"]["/healthz"]["get"]


ADMIN_KEY = "uk-admin-only-99"


async def test_admin_endpoints_are_off_unless_enabled_or_keyed(tiny_model_dir: Path, tiny_engine: OnnxEngine) -> None:
    # default: disabled, whatever the caller sends (and no API keys configured: it would be open to anyone)
    async with running_app(make_settings(tiny_model_dir), lambda s: tiny_engine) as (_app, client):
        r = await client.post("/admin/reload-policies")
        assert r.status_code == 404 and r.json()["error"]["code"] == "admin_disabled", r.text
        assert "UNIGUARD_ADMIN_KEY_HASHES" in r.json()["error"]["message"]
        assert (await client.post("/classify", json=BODY)).status_code == 200  # the rest stays open
    # an admin key enables them for that key only (an API key is not enough)
    settings = make_settings(tiny_model_dir, api_key_hashes=[hash_key(KEY)], admin_key_hashes=[hash_key(ADMIN_KEY)])
    async with running_app(settings, lambda s: tiny_engine) as (_app, client):
        for headers in ({}, {"authorization": f"Bearer {KEY}"}, {"authorization": "Bearer nope"}):
            r = await client.post("/admin/reload-policies", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", (headers, r.text)
        r = await client.post("/admin/reload-policies", headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert r.status_code == 200 and "toxicity" in r.json()["policies"], r.text
        # the admin key is not an API key
        r = await client.post("/classify", json=BODY, headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert r.status_code == 401
    # the explicit switch enables them without an admin key
    async with running_app(make_settings(tiny_model_dir, admin_enabled=True), lambda s: tiny_engine) as (_a, client):
        assert (await client.post("/admin/reload-policies")).status_code == 200


async def test_probes_can_require_the_key(tiny_model_dir: Path, tiny_engine: OnnxEngine) -> None:
    settings = make_settings(tiny_model_dir, api_key_hashes=[hash_key(KEY)], public_paths=["/healthz"])
    async with running_app(settings, lambda s: tiny_engine) as (_app, client):
        assert (await client.get("/healthz")).status_code == 200
        for path in ("/readyz", "/metrics"):
            assert (await client.get(path)).status_code == 401, path
            assert (await client.get(path, headers={"authorization": f"Bearer {KEY}"})).status_code == 200


async def test_no_keys_configured_means_open(tiny_model_dir: Path, tiny_engine: OnnxEngine) -> None:
    async with running_app(make_settings(tiny_model_dir), lambda s: tiny_engine) as (_app, client):
        assert (await client.post("/classify", json=BODY)).status_code == 200
        assert (await client.post("/classify", json=BODY, headers={"authorization": "Bearer x"})).status_code == 200
        assert "securitySchemes" not in (await client.get("/openapi.json")).json().get("components", {})


def test_key_check_compares_every_hash_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    hashes = [hash_key(f"key-{i}") for i in range(5)]
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    assert key_matches("key-0", hashes)  # the first hash matches: the others are still compared
    assert len(calls) == 5
    calls.clear()
    assert not key_matches("nope", hashes) and len(calls) == 5
    calls.clear()
    assert not key_matches(None, hashes) and len(calls) == 5
    assert bearer_token("Bearer abc") == "abc" and bearer_token("Token abc") is None and bearer_token(None) is None


def test_invalid_key_hash_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIGUARD_API_KEY_HASHES", f"{hash_key(KEY)},plain-text-key")
    with pytest.raises(SettingsError, match=r"UNIGUARD_API_KEY_HASHES.*sha256"):
        load_settings()
    monkeypatch.setenv("UNIGUARD_API_KEY_HASHES", f" {hash_key(KEY)} , {hash_key(OTHER_KEY)}")
    assert load_settings().api_key_hashes == [hash_key(KEY), hash_key(OTHER_KEY)]
    monkeypatch.setenv("UNIGUARD_PUBLIC_PATHS", "/healthz,/classify")
    with pytest.raises(SettingsError, match="UNIGUARD_PUBLIC_PATHS"):
        load_settings()
