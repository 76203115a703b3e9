"""``uniguard serve`` (``uniguard bench`` lives in ``uniguard.bench``: it is no part of the service)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.config import Settings
    from service.engine import OnnxEngine


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


class StartupError(RuntimeError):
    """The service must not start; the message names the file or setting and the fix."""


def _fixed(engine: OnnxEngine) -> Callable[[Settings], OnnxEngine]:
    return lambda _settings: engine


def preload_engine(settings: Settings) -> OnnxEngine | None:
    """Load the configured model before listening, so a missing, corrupt or incompatible model stops the start-up.

    Only a missing *default* model folder is tolerated (None: the app starts not-ready and /readyz says how to
    build the model), so `make serve` answers /healthz before `make model` has run.
    """
    from export.manifest import ManifestError
    from service.engine import EngineError, OnnxEngine

    model_dir = settings.resolved_model_dir
    if not model_dir.exists() and settings.is_default_model_dir:
        return None
    try:
        return OnnxEngine(model_dir, provider=settings.provider, threads=settings.intra_op_threads)
    except (ManifestError, EngineError, OSError, ValueError) as exc:
        raise StartupError(f"cannot load the model (UNIGUARD_MODEL_DIR / --model = {model_dir}): {exc}") from exc


def run_serve(args: argparse.Namespace) -> int:
    """Refuse to start on an invalid setting, policy file or model (exit 2, the message on stderr), then serve."""
    import signal
    import sys

    from policies.registry import PolicyError, PolicyRegistry
    from service.app import create_app
    from service.config import SettingsError, load_settings
    from service.logs import configure_logging
    from service.server import run as serve

    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the app installs its policy-reload handler
    try:
        settings = load_settings(host=args.host, port=args.port, model_dir=args.model, config_file=args.config)
    except SettingsError as exc:
        print(f"uniguard serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        registry = PolicyRegistry.load(settings.policy_dirs)
    except (PolicyError, OSError) as exc:
        print(f"uniguard serve: invalid policy file (fix it or UNIGUARD_POLICY_DIRS): {exc}", file=sys.stderr)
        return 2
    try:
        engine = preload_engine(settings)
    except StartupError as exc:
        print(f"uniguard serve: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings, _fixed(engine) if engine is not None else None, registry=registry, handle_signals=True)
    # uvicorn drains in-flight requests and runs the lifespan shutdown (which finishes queued batches) on SIGTERM
    # or SIGINT, then re-raises the signal; these handlers make that re-raise a clean exit (status 0).
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    serve(app, settings)
    return 0
