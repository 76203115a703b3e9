"""The policy registry: the default policies plus any user folders, validated at load time."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import yaml
from pydantic import ValidationError

from policies.schema import Policy

DEFAULT_POLICY_DIR = Path(__file__).resolve().parent / "default"
# Moderation categories (hate, self-harm, sexual content, violence ...): served, not enabled by default.
CATEGORY_POLICY_DIR = Path(__file__).resolve().parent / "categories"
BUILTIN_POLICY_DIRS = (DEFAULT_POLICY_DIR, CATEGORY_POLICY_DIR)


class PolicyError(ValueError):
    """A policy file is invalid or clashes with another; the message names the file."""


def load_policy_file(path: Path) -> Policy:
    """Read and validate one policy YAML file."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PolicyError(f"{path}: cannot read policy file: {exc}") from exc
    if not isinstance(raw, dict):
        raise PolicyError(f"{path}: a policy file must hold a mapping (name, description, ...)")
    try:
        return Policy.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise PolicyError(f"{path}: invalid policy: {problems}") from exc


def _policy_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise PolicyError(f"{folder}: policy folder does not exist")
    return sorted(p for p in folder.iterdir() if p.suffix in {".yaml", ".yml"} and p.is_file())


class PolicyRegistry:
    """An immutable set of named policies."""

    def __init__(self, policies: Iterable[Policy]) -> None:
        self._policies: dict[str, Policy] = {}
        for policy in policies:
            if policy.name in self._policies:
                raise PolicyError(f"duplicate policy name {policy.name!r}")
            self._policies[policy.name] = policy

    @classmethod
    def load(cls, folders: Iterable[Path] = (), include_default: bool = True) -> PolicyRegistry:
        """Load the built-in folders (defaults and categories, unless excluded) and every user folder, in order."""
        sources: dict[str, Path] = {}
        policies: list[Policy] = []
        all_folders = (list(BUILTIN_POLICY_DIRS) if include_default else []) + [Path(f) for f in folders]
        for folder in all_folders:
            for path in _policy_files(folder):
                policy = load_policy_file(path)
                if policy.name in sources:
                    raise PolicyError(
                        f"{path}: duplicate policy name {policy.name!r} (already defined in {sources[policy.name]})"
                    )
                sources[policy.name] = path
                policies.append(policy)
        return cls(policies)

    def __contains__(self, name: object) -> bool:
        return name in self._policies

    def __getitem__(self, name: str) -> Policy:
        return self._policies[name]

    def __iter__(self) -> Iterator[Policy]:
        return iter(self._policies.values())

    def __len__(self) -> int:
        return len(self._policies)

    @property
    def names(self) -> list[str]:
        return list(self._policies)

    def defaults(self) -> list[Policy]:
        """The policies applied when a request names none."""
        return [p for p in self._policies.values() if p.enabled_by_default]
