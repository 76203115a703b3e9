"""``uniguard train`` (taskguard, multitask)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    train = sub.add_parser("train", help="train TaskGuard or MultiTaskGuard models", description="Train guard models.")
    train.set_defaults(func=lambda a: train.print_help() or 2)
