"""``uniguard eval``: per-policy metrics of a checkpoint or an exported model."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    ev = sub.add_parser("eval", help="evaluate a model on JSONL data", description="Evaluate a model.")
    ev.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    raise SystemExit("uniguard eval: not implemented yet")
