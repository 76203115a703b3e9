"""The manifest of an exported model folder: one schema, written by export, read by the service.

This module imports only pydantic and the standard library so the service can use it without the
export stage's heavy dependencies.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from policies.instruction import EncodingConfig
from policies.schema import DataSource, PolicyRef

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION: Literal[1] = 1
Target = Literal["cpu-int8", "cpu-fp32", "cuda-fp16"]
TARGETS: tuple[Target, ...] = ("cpu-int8", "cpu-fp32", "cuda-fp16")


QUERY_INPUTS = ("input_ids", "token_type_ids", "position_ids", "attention_mask")


class KVLayout(BaseModel):
    """How a prefix-mode graph takes and returns keys/values (recorded in the manifest)."""

    model_config = ConfigDict(extra="forbid")

    layers: int
    heads: int
    head_dim: int
    max_policy_len: int  # P: the longest policy segment ([CLS] + max_policy_tokens + [SEP])
    policy_inputs: str = "policy_key_{layer}, policy_value_{layer}: float32 [policies, heads, P, head_dim]"
    index_inputs: str = "policy_mask: int64 [policies, P]; policy_index: int64 [batch]"
    present_outputs: str = "present_key_{layer}, present_value_{layer}: float32 [batch, heads, query, head_dim]"

    def input_names(self) -> list[str]:
        bank = [f"policy_{kind}_{layer}" for layer in range(self.layers) for kind in ("key", "value")]
        return [*QUERY_INPUTS, *bank, "policy_mask", "policy_index"]

    def output_names(self) -> list[str]:
        present = [f"present_{kind}_{layer}" for layer in range(self.layers) for kind in ("key", "value")]
        return ["logits", *present]

    @property
    def bytes_per_policy(self) -> int:
        return 2 * self.layers * self.heads * self.max_policy_len * self.head_dim * 4 + self.max_policy_len * 8


class ManifestError(RuntimeError):
    """A model folder is missing, corrupt or incompatible; the message names the file and the fix."""


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    version: str
    base_model: str
    target: Target
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    recipe: dict[str, Any] = Field(default_factory=dict)
    policies: list[PolicyRef]
    encoding: EncodingConfig
    thresholds: dict[str, float]
    default_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    input_names: list[str]
    output_name: str = "logits"
    # prefix mode (encoding.mode == "prefix"): how the graph takes and returns policy keys/values
    kv_layout: KVLayout | None = None
    files: dict[str, FileEntry]
    data_sources: list[DataSource] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)
    parity: dict[str, Any] = Field(default_factory=dict)
    # How the file was produced: tool versions, opset, graph optimisation, quantisation config.
    export: dict[str, Any] = Field(default_factory=dict)

    @property
    def model_id(self) -> str:
        return f"{self.name}@{self.version}"

    def threshold_for(self, policy: str) -> float | None:
        return self.thresholds.get(policy)

    def save(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: Path, verify: bool = True) -> Manifest:
        """Read the manifest of a model folder and (by default) verify every file's checksum."""
        folder = Path(folder)
        path = folder / MANIFEST_FILE
        if not folder.is_dir():
            raise ManifestError(
                f"{folder}: model folder does not exist; export one with `uniguard export` or set UNIGUARD_MODEL_DIR"
            )
        if not path.is_file():
            raise ManifestError(
                f"{path}: missing; this folder is not an exported UniGuard model (run `uniguard export`)"
            )
        try:
            manifest = cls.model_validate_json(path.read_text(encoding="utf-8"))
        except ValidationError as exc:
            raise ManifestError(f"{path}: invalid or incompatible manifest (re-export the model): {exc}") from exc
        if verify:
            manifest.verify(folder)
        return manifest

    def verify(self, folder: Path) -> None:
        for role, entry in self.files.items():
            file = Path(folder) / entry.path
            if not file.is_file():
                raise ManifestError(f"{file}: {role} file listed in {MANIFEST_FILE} is missing; re-export the model")
            digest = sha256_file(file)
            if digest != entry.sha256:
                raise ManifestError(
                    f"{file}: checksum mismatch ({digest[:12]}… != {entry.sha256[:12]}… in {MANIFEST_FILE}); "
                    "the file is corrupt or was changed: re-export the model or restore the file"
                )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(folder: Path, name: str) -> FileEntry:
    path = Path(folder) / name
    return FileEntry(path=name, sha256=sha256_file(path), bytes=path.stat().st_size)
