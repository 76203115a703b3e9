"""The ``uniguard`` command. Each stage registers its own subcommands; heavy imports stay lazy."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from uniguard import __version__


def build_parser() -> argparse.ArgumentParser:
    from export.cli import register as register_export
    from merging.cli import register as register_merge
    from service.cli import register as register_service
    from training.cli import register as register_training
    from training.synth_cli import register as register_synth
    from uniguard.evaluate import register as register_eval

    parser = argparse.ArgumentParser(
        prog="uniguard",
        description="UniGuard guardrail models: train, merge, export, evaluate and serve.",
    )
    parser.add_argument("--version", action="version", version=f"uniguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_service(sub)  # serve, bench
    register_eval(sub)  # eval
    register_training(sub)  # train
    register_synth(sub)  # synth
    register_merge(sub)  # merge
    register_export(sub)  # export
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
