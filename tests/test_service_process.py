"""A real `uniguard serve` process (flags over environment, SIGTERM) and a short `uniguard bench` run."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from service.cli import register
from service.localserver import LocalServer
from uniguard.bench import make_prompt_mix
from uniguard.cli import main


def test_serve_help_lists_every_setting() -> None:
    import argparse

    from service.config import Settings

    parser = argparse.ArgumentParser(prog="uniguard")
    register(parser.add_subparsers())
    help_text = parser._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    for name in Settings.model_fields:
        assert f"UNIGUARD_{name.upper()}" in help_text
    assert "[default: 16384]" in help_text  # defaults are shown (UNIGUARD_MAX_QUEUE)


def test_serve_process_then_bench_against_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`uniguard serve`: flags beat the environment, which beats the config file; `uniguard bench --url` measures
    it; SIGTERM drains and exits 0."""
    config = tmp_path / "uniguard.yaml"
    config.write_text("max_texts_per_request: 2\nport: 1\n", encoding="utf-8")
    settings = {
        "UNIGUARD_PORT": "1",
        "UNIGUARD_MODEL_DIR": "/nonexistent",
        "UNIGUARD_CONFIG_FILE": str(config),
        "UNIGUARD_LOG_LEVEL": "warning",
        "UNIGUARD_REDIS_URL": "",
    }
    server = LocalServer(tiny_model_dir, settings=settings, log_path=tmp_path / "serve.log")  # --port/--model flags
    out = tmp_path / "bench.json"
    try:
        server.start(ready_timeout_s=60)
        url = server.url
        r = httpx.post(url + "/classify", json={"input": "hello", "policies": ["toxicity"]}, timeout=10)
        assert r.status_code == 200 and r.json()["results"][0]["policies"]["toxicity"]["cached"] is False
        r = httpx.post(url + "/classify", json={"input": ["a", "b", "c"]}, timeout=10)  # limit from the config file
        assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_texts"
        bench = ["bench", "--model", str(tiny_model_dir), "--url", url, "--seconds", "0.3", "--concurrency", "1,4"]
        assert main([*bench, "--prompts", "30", "--json", str(out)]) == 0
    finally:
        code = server.stop()
    log = server.log_tail(100_000)
    assert code == 0, log[-2000:]
    assert "Traceback" not in log
    result = json.loads(out.read_text())
    assert result["engine"]["single_stream"]["pairs_per_s"] > 0 and result["engine"]["batch32"]["pairs_per_s"] > 0
    assert [lv["concurrency"] for lv in result["service"]["levels"]] == [1, 4]
    assert all(lv["requests"] > 0 and lv["errors"] == 0 for lv in result["service"]["levels"])
    assert result["service"]["half_saturation"]["requests"] > 0
    assert result["service"]["cached"]["all_cached"] is True
    assert set(result["targets"]) == {"throughput_ratio", "p99_half_saturation_vs_batch", "cached_p99_ms"}


def test_bench_refuses_remote_urls() -> None:
    with pytest.raises(SystemExit, match="localhost"):
        main(["bench", "--url", "http://example.com:8000", "--no-engine"])


def test_prompt_mix_is_varied_and_deterministic() -> None:
    names = ["a_policy", "b_policy", "c_policy", "d_policy", "e_policy"]
    mix = make_prompt_mix(200, names, seed=1)
    assert mix == make_prompt_mix(200, names, seed=1)
    assert {len(p.policies) for p in mix} == {1, 2, 3, 4, 5}
    lengths = sorted(len(p.text) for p in mix)
    assert lengths[0] < 200 and lengths[-1] > 2000
