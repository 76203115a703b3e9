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
# Every policy belongs to one group: its `group` field, else CUSTOM_GROUP. Groups are listed in this order first.
DEFAULT_GROUP, CATEGORY_GROUP, CUSTOM_GROUP = "defaults", "categories", "custom"
GROUP_ORDER = (DEFAULT_GROUP, CATEGORY_GROUP)


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


def group_of(policy: Policy) -> str:
    """The group a policy belongs to: its own ``group``, else "custom"."""
    return policy.group or CUSTOM_GROUP


class PolicyRegistry:
    """An immutable set of named policies."""

    def __init__(self, policies: Iterable[Policy]) -> None:
        self._policies: dict[str, Policy] = {}
        for policy in policies:
            if policy.name in self._policies:
                raise PolicyError(f"duplicate policy name {policy.name!r}")
            self._policies[policy.name] = policy
        groups: dict[str, list[str]] = {}
        for policy in self._policies.values():
            groups.setdefault(group_of(policy), []).append(policy.name)
        order = [g for g in GROUP_ORDER if g in groups] + sorted(set(groups) - {*GROUP_ORDER, CUSTOM_GROUP})
        self._groups = {g: groups[g] for g in [*order, CUSTOM_GROUP] if g in groups}
        for name in self._policies:
            if name in self._groups:
                raise PolicyError(
                    f"policy name {name!r} is also the name of a group of policies ({', '.join(self._groups[name])}); "
                    "a request names either, so rename the policy or the group"
                )
        for policy in self._policies.values():
            if policy.category_group is not None and policy.category_group not in self._groups:
                raise PolicyError(
                    f"policy {policy.name!r}: category_group {policy.category_group!r} names no group of policies; "
                    f"groups: {', '.join(self._groups)}"
                )

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

    @property
    def groups(self) -> dict[str, list[str]]:
        """Group name -> its policies' names, in registry order (defaults, categories, other groups, custom)."""
        return {g: list(names) for g, names in self._groups.items()}

    def group(self, name: str) -> list[Policy]:
        """The policies of a group ([] for an unknown group)."""
        return [self._policies[n] for n in self._groups.get(name, [])]

    def defaults(self) -> list[Policy]:
        """The policies applied when a request names none."""
        return [p for p in self._policies.values() if p.enabled_by_default]
