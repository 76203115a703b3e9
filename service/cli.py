"""``uniguard serve`` and ``uniguard bench``."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the HTTP service", description="Run the UniGuard HTTP service.")
    serve.add_argument("--host", default=None, help="bind address (env UNIGUARD_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (env UNIGUARD_PORT, default 8000)")
    serve.add_argument("--model", default=None, help="exported model folder (env UNIGUARD_MODEL_DIR)")
    serve.set_defaults(func=run_serve)

    bench = sub.add_parser("bench", help="benchmark the engine and the service", description="Benchmark throughput and latency.")
    bench.add_argument("--model", default=None, help="exported model folder")
    bench.set_defaults(func=run_bench)


def run_serve(args: argparse.Namespace) -> int:
    raise SystemExit("uniguard serve: not implemented yet")


def run_bench(args: argparse.Namespace) -> int:
    raise SystemExit("uniguard bench: not implemented yet")
