"""Privacy and start-up decisions in-process: prompts never reach the logs (at any level, on success or on any error)
or the in-process cache; the JSON log format; only a missing *default* model folder is tolerated at start-up."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from service import cli, config
from service.config import Settings
from service.engine import OnnxEngine
from service.logs import JsonFormatter, new_request_id
from tests.service_support import make_settings, running_app
from tests.test_reliability_failmode import BrokenEngine

SECRET = "ocelot-marmalade-5512 my bank password is hunter2"


async def test_prompts_never_reach_logs_or_cache(
    tiny_model_dir: Path, tiny_engine: OnnxEngine, caplog: pytest.LogCaptureFixture
) -> None:
    broken = BrokenEngine(tiny_engine)
    formatter = JsonFormatter()
    with caplog.at_level(logging.DEBUG):
        async with running_app(make_settings(tiny_model_dir), lambda s: broken) as (app, client):  # type: ignore[arg-type,return-value]
            ok = await client.post("/classify", json={"input": [SECRET, "fine"]}, headers={"X-Request-ID": "abc-1"})
            assert ok.status_code == 200 and ok.headers["x-request-id"] == "abc-1"
            for bad in (
                {"input": SECRET, "policies": ["nope_policy"]},
                {"input": [SECRET, " "]},
                {"input": SECRET * 1000},
                {"input": SECRET, "thresholds": {SECRET: 0.5}},
                {"input": SECRET, "custom_policies": [{"name": "x", "description": SECRET, "disallowed": []}]},
                {"input": SECRET, "unexpected": SECRET},
            ):
                r = await client.post("/classify", json=bad)
                assert r.status_code == 422, r.text
            broken.broken = True
            r = await client.post("/classify", json={"input": SECRET + " again", "policies": ["toxicity"]})
            assert r.status_code == 503
            cache = app.state.uniguard.guard.cache
            stored = repr(cache._data)
    assert "ocelot" not in stored and "hunter2" not in stored
    lines = [formatter.format(record) for record in caplog.records]
    assert lines, "nothing was logged"
    for line in lines:
        assert "ocelot" not in line and "hunter2" not in line, line
    entries = [json.loads(line) for line in lines]
    access = [e for e in entries if e["logger"] == "uniguard.access"]
    assert {e["status"] for e in access} >= {200, 422, 503}
    (first,) = [e for e in access if e.get("request_id") == "abc-1"]
    assert {"ts", "level", "msg", "request_id", "method", "path", "status", "latency_ms"} <= set(first)
    assert any("inference failed" in e["msg"] for e in entries)


def test_json_formatter_drops_exception_messages_and_unknown_extras() -> None:
    try:
        raise ValueError(f"input_value={SECRET!r}")
    except ValueError as exc:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed: %s", ("ValueError",), None)
        record.exc_info = (type(exc), exc, exc.__traceback__)
    record.prompt = SECRET  # not an allowed extra field
    entry = json.loads(JsonFormatter().format(record))
    assert entry["exc_type"] == "ValueError" and "exc_where" in entry and entry["msg"] == "failed: ValueError"
    assert SECRET not in json.dumps(entry)
    assert new_request_id("ok-id_1.2") == "ok-id_1.2"
    assert len(new_request_id("bad id with spaces")) == 32 and len(new_request_id("x" * 200)) == 32


def test_only_a_missing_default_model_is_tolerated(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = tmp_path / "models" / "uniguard-minilm"
    monkeypatch.setattr(config, "DEFAULT_MODEL_DIR", default)
    assert cli.preload_engine(Settings(model_dir=default, config_file=None)) is None  # starts not-ready
    with pytest.raises(cli.StartupError, match=r"UNIGUARD_MODEL_DIR.*other-model"):
        cli.preload_engine(Settings(model_dir=tmp_path / "other-model", config_file=None))
    engine = cli.preload_engine(Settings(model_dir=tiny_model_dir, config_file=None))
    assert engine is not None and engine.model_id
