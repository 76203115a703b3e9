"""``uniguard synth``: policy-driven synthetic data from an OpenAI-compatible endpoint."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

EPILOG = """\
example (a local vLLM / Ollama / llama.cpp server, or a hosted API with its key in $OPENAI_API_KEY):
  uniguard synth --policy my_policies/medical_advice.yaml --n 1000 --out data/medical_advice.synth.jsonl \\
      --endpoint http://localhost:8000/v1 --model Qwen/Qwen2.5-7B-Instruct --against data/existing.jsonl

writes beside --out: <out>.report.json (calls, tokens, retries, invalid items, duplicates, relabels, balance)
and <out>.refined_policy.yaml (clearer wording proposed by the self-review pass; review it before use).
An interrupted run continues where it stopped when rerun with the same --out.
"""


def register(sub: Any) -> None:
    synth = sub.add_parser(
        "synth",
        help="generate synthetic policy data with an LLM endpoint",
        description="Generate balanced, deduplicated synthetic prompts for a policy with any OpenAI-compatible "
        "chat-completions endpoint, self-review a sample, and propose a refined policy.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    synth.add_argument("--policy", type=Path, required=True, help="policy YAML file (the Policy schema)")
    synth.add_argument("--n", type=int, required=True, help="number of rows wanted in --out (half unsafe, half safe)")
    synth.add_argument("--out", type=Path, required=True, help="output JSONL (appended to; rerun to resume)")
    synth.add_argument("--endpoint", required=True, help="base URL of the API, e.g. http://localhost:8000/v1")
    synth.add_argument("--model", required=True, help="model name sent to the endpoint (rows get source synth:<model>)")
    synth.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    synth.add_argument("--concurrency", type=int, default=4, help="maximum in-flight calls (default 4)")
    synth.add_argument("--batch-size", type=int, default=10, help="items asked per call (default 10)")
    synth.add_argument(
        "--refine-sample", type=float, default=0.2, help="fraction of rows self-reviewed, 0 disables (default 0.2)"
    )
    synth.add_argument(
        "--dedup-threshold", type=float, default=0.92, help="cosine similarity above which texts are near-duplicates"
    )
    synth.add_argument(
        "--against", type=Path, action="append", default=[], help="existing JSONL to dedup against (repeatable)"
    )
    synth.add_argument("--temperature", type=float, default=0.9)
    synth.add_argument("--max-tokens", type=int, default=3000, help="max completion tokens per call")
    synth.add_argument("--timeout", type=float, default=120.0, help="seconds per call")
    synth.add_argument("--max-retries", type=int, default=5, help="retries per call (429/5xx/timeouts/bad JSON)")
    synth.add_argument("--backoff-base", type=float, default=1.0, help="first backoff in seconds (doubles)")
    synth.add_argument("--backoff-max", type=float, default=60.0, help="longest backoff in seconds")
    synth.add_argument("--max-requests", type=int, default=None, help="cap on generation calls (default: automatic)")
    synth.add_argument("--price-per-1k", type=float, default=None, help="price per 1000 tokens, for a cost estimate")
    synth.add_argument(
        "--price-per-1k-completion", type=float, default=None, help="completion-token price if it differs"
    )
    synth.add_argument("--languages", default="en,de,es,fr", help="comma-separated; the first is the main one")
    synth.add_argument("--license", default="synthetic", help="license field written in every row")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument(
        "--no-json-mode", action="store_true", help="do not send response_format (for servers that reject it)"
    )
    synth.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    synth.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from policies.registry import PolicyError
    from training.synth import SynthConfig, SynthError, format_summary, synthesize

    try:
        cfg = SynthConfig(
            policy_file=args.policy,
            out=args.out,
            n=args.n,
            endpoint=args.endpoint,
            model=args.model,
            api_key_env=args.api_key_env,
            concurrency=args.concurrency,
            batch_size=args.batch_size,
            refine_sample=args.refine_sample,
            dedup_threshold=args.dedup_threshold,
            against=args.against,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            timeout_s=args.timeout,
            max_retries=args.max_retries,
            backoff_base_s=args.backoff_base,
            backoff_max_s=args.backoff_max,
            max_requests=args.max_requests,
            price_per_1k=args.price_per_1k,
            price_per_1k_completion=args.price_per_1k_completion,
            languages=[x.strip() for x in args.languages.split(",") if x.strip()],
            license=args.license,
            seed=args.seed,
            json_mode=not args.no_json_mode,
            progress=not args.no_progress,
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        print(f"uniguard synth: invalid options: {problems}", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(synthesize(cfg, log=lambda message: print(message, file=sys.stderr)))
    except (SynthError, PolicyError) as exc:
        print(f"uniguard synth: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nuniguard synth: interrupted; rows written so far are in {cfg.out}; rerun to resume", file=sys.stderr)
        return 130
    print(format_summary(report))
    return 0 if report.complete else 3
