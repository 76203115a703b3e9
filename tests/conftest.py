"""Shared fixtures. Tiny models are built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tinymodel import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT guard checkpoint (Hugging Face folder + uniguard_meta.json)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")
