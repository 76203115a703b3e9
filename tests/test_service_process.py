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
    (model,) = result["models"]
    assert model["mode"] == "full" and model["engine"]["saturation"]["pairs_per_s"] > 0
    service = model["service"]
    assert service["saturation_short"]["requests"] > 0 and model["engine"]["saturation_short"]["pairs_per_s"] > 0
    assert service["idle_1x1"]["n"] > 0 and service["idle_1x5"]["p50_ms"] > 0
    assert [lv["concurrency"] for lv in service["levels"]] == [1, 4]
    assert all(lv["requests"] > 0 and lv["errors"] == 0 for lv in service["levels"])
    assert service["cached"]["all_cached"] is True
    assert {"idle_1x5_p50_ms", "extra_policy_share_of_one", "service_vs_engine", "cached_p99_ms"} <= set(
        result["targets"]
    )


def test_bench_refuses_remote_urls() -> None:
    with pytest.raises(SystemExit, match="localhost"):
        main(["bench", "--url", "http://example.com:8000", "--no-engine"])


def test_prompt_mix_is_varied_and_deterministic() -> None:
    names = ["a_policy", "b_policy", "c_policy", "d_policy", "e_policy"]
    mix = make_prompt_mix(200, names, seed=1)
    assert mix == make_prompt_mix(200, names, seed=1)
    assert all(p.policies is None for p in make_prompt_mix(20))  # the service's defaults
    assert {len(p.policies) for p in mix} == {1, 2, 3, 4, 5}
    lengths = sorted(len(p.text) for p in mix)
    assert lengths[0] < 200 and lengths[-1] > 2000


def test_targets_compare_the_first_model_with_the_second_the_peer_and_its_engine() -> None:
    from uniguard.bench import targets

    def service(p50_1: float, p50_5: float, prompts: float) -> dict:
        sat = {"prompts_per_s": prompts, "pairs_per_s": prompts * 5, "concurrency": 16}
        short = {**sat, "prompts_per_s": prompts * 2}
        return {"idle_1x1": {"p50_ms": p50_1, "p99_ms": 9.0}, "idle_1x5": {"p50_ms": p50_5, "p99_ms": 20.0},
                "saturation": sat, "saturation_short": short, "cached": {"p99_ms": 2.0}}  # fmt: skip

    result = {
        "models": [
            {"service": service(6.0, 10.0, 45.0), "engine": {"saturation": {"pairs_per_s": 240.0}}},
            {"service": service(11.0, 39.0, 9.0)},
        ],
        "peer": {"saturation": {"prompts_per_s": 3.0}, "saturation_short": {"prompts_per_s": 4.0}},
        "training": [{"mode": "prefix", "examples_per_s_mean": 14.0}, {"mode": "full", "examples_per_s_mean": 5.0}],
    }
    t = targets(result)
    assert t["idle_1x5_p50_ms"]["ok"] and t["idle_1x5_p99_ms"]["ok"]
    assert (
        t["extra_policy_share_of_one"]["value"] == pytest.approx((10 - 6) / 4 / 6)
        and t["extra_policy_share_of_one"]["ok"]
    )
    assert t["saturation_vs_second_model"]["value"] == pytest.approx(5.0) and t["saturation_vs_peer"]["value"] == 15.0
    assert t["saturation_vs_peer_short_prompts"]["value"] == pytest.approx(90 / 4)
    assert t["service_vs_engine"]["value"] == pytest.approx(225 / 240) and t["service_vs_engine"]["ok"]
    assert t["training_prefix_vs_full"]["value"] == pytest.approx(2.8) and t["cached_p99_ms"]["ok"]


async def test_naive_peer_scores_one_pair_per_forward(tiny_checkpoint: Path) -> None:
    from uniguard.peer import create_app

    transport = httpx.ASGITransport(app=create_app(tiny_checkpoint))
    async with httpx.AsyncClient(transport=transport, base_url="http://peer") as client:
        assert (await client.get("/readyz")).status_code == 200
        r = await client.post("/classify", json={"input": "hello"})
        verdicts = r.json()["results"][0]["policies"]
        assert r.status_code == 200 and len(verdicts) == 5 and all(0 <= v["score"] <= 1 for v in verdicts.values())
        r = await client.post("/classify", json={"input": "hello", "policies": ["toxicity"]})
        assert list(r.json()["results"][0]["policies"]) == ["toxicity"]
