"""``uniguard train`` (taskguard, multitask) and ``uniguard synth``."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    train = sub.add_parser("train", help="train TaskGuard or MultiTaskGuard models", description="Train guard models.")
    train.set_defaults(func=lambda a: train.print_help() or 2)
    synth = sub.add_parser("synth", help="generate synthetic policy data with an LLM endpoint", description="Generate synthetic data.")
    synth.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    raise SystemExit("uniguard synth: not implemented yet")
