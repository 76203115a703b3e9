"""``uniguard serve`` and ``uniguard bench``."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    from service.config import settings_help

    serve = sub.add_parser(
        "serve",
        help="run the HTTP service",
        description="Run the UniGuard HTTP service (one uvicorn worker; SIGTERM drains queued work, then exits). "
        "Flags override environment variables, which override UNIGUARD_CONFIG_FILE.",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", default=None, help="bind address (env UNIGUARD_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (env UNIGUARD_PORT, default 8000)")
    serve.add_argument("--model", default=None, help="exported model folder (env UNIGUARD_MODEL_DIR)")
    serve.add_argument("--config", default=None, help="YAML/JSON settings file (env UNIGUARD_CONFIG_FILE)")
    serve.set_defaults(func=run_serve)

    bench = sub.add_parser(
        "bench",
        help="benchmark the engine and the service",
        description="Benchmark, in one run and on one prompt mix, the raw ONNX Runtime engine and the service over "
        "HTTP at several concurrencies (localhost only).",
    )
    bench.add_argument(
        "--model", default=None, help="exported model folder (default: UNIGUARD_MODEL_DIR or models/uniguard-minilm)"
    )
    bench.add_argument("--url", default=None, help="bench a running service instead of starting one (localhost only)")
    bench.add_argument("--seconds", type=float, default=10.0, help="duration of each measurement")
    bench.add_argument("--concurrency", default="1,4,16,64", help="comma-separated client concurrencies")
    bench.add_argument("--prompts", type=int, default=400, help="size of the prompt mix")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--no-engine", dest="engine", action="store_false", help="skip the raw engine measurement")
    bench.add_argument("--no-service", dest="service", action="store_false", help="skip the HTTP measurement")
    bench.add_argument("--json", default=None, help="write the results to this JSON file")
    bench.set_defaults(func=run_bench)


def run_serve(args: argparse.Namespace) -> int:
    import logging
    import signal

    import uvicorn

    from service.app import create_app
    from service.config import SettingsError, load_settings

    try:
        settings = load_settings(host=args.host, port=args.port, model_dir=args.model, config_file=args.config)
    except SettingsError as exc:
        raise SystemExit(f"uniguard serve: {exc}") from None
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    # uvicorn drains in-flight requests and runs the lifespan shutdown (which finishes queued batches) on SIGTERM
    # or SIGINT, then re-raises the signal; these handlers make that re-raise a clean exit (status 0).
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 1,
        access_log=False,
    )
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from service.bench import main

    return main(args)
