"""``uniguard export``."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    export = sub.add_parser("export", help="export a checkpoint to ONNX", description="Export a checkpoint to ONNX.")
    export.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    raise SystemExit("uniguard export: not implemented yet")
