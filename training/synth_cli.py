"""``uniguard synth``: policy-driven synthetic data from an OpenAI-compatible endpoint."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    synth = sub.add_parser("synth", help="generate synthetic policy data with an LLM endpoint", description="Generate synthetic data.")
    synth.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    raise SystemExit("uniguard synth: not implemented yet")
