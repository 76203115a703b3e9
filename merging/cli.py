"""``uniguard merge``."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    merge = sub.add_parser("merge", help="merge guard models (methods and bandit search)", description="Merge guard models.")
    merge.set_defaults(func=lambda a: merge.print_help() or 2)
