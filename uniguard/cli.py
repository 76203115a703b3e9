"""The ``uniguard`` command. Each stage registers its own subcommands; heavy imports stay lazy."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from uniguard import __version__

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
    register_service(sub)  # serve, bench
    for module in ("uniguard.evaluate", "training.cli", "training.synth_cli", "merging.cli", "export.cli"):
        _register(module, sub)  # eval, train, synth, merge, export
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
