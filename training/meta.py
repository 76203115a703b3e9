"""Metadata that every checkpoint folder (TaskGuard, MultiTaskGuard, merged UniGuard) carries.

Written as ``uniguard_meta.json`` beside the Hugging Face weights; merging and export read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from policies.instruction import EncodingConfig
from policies.schema import DataSource, PolicyRef

META_FILE = "uniguard_meta.json"


class CheckpointMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["taskguard", "multitask", "uniguard"]
    name: str
    base_model: str
    policies: list[PolicyRef]
    encoding: EncodingConfig = Field(default_factory=EncodingConfig)
    thresholds: dict[str, float] = Field(default_factory=dict)
    default_threshold: float = 0.5
    data_sources: list[DataSource] = Field(default_factory=list)
    recipe: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)

    def save(self, folder: Path) -> None:
        (Path(folder) / META_FILE).write_text(self.model_dump_json(indent=2), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> CheckpointMeta:
        path = Path(folder) / META_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not a UniGuard checkpoint (missing {META_FILE})")
        return cls.model_validate_json(path.read_text(encoding="utf-8"))
