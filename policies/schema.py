"""The policy schema: one pydantic model shared by the registry files, training and the API."""

from __future__ import annotations

import hashlib
import re
import string

from pydantic import BaseModel, ConfigDict, Field, field_validator

from policies.labels import Label

NAME_PATTERN = r"^[a-z][a-z0-9_]{1,63}$"
# A policy's safe reply: plain text with these placeholders only ({{ and }} for literal braces).
RESPONSE_PLACEHOLDERS = frozenset({"policy"})
MAX_RESPONSE_CHARS = 500


def check_response(template: str) -> str:
    """Validate a safe-reply template: non-empty, short, and only the known placeholders (no format specs)."""
    template = re.sub(r"\s+", " ", template).strip()
    if not template:
        raise ValueError("response must not be empty (leave it out for no reply)")
    if len(template) > MAX_RESPONSE_CHARS:
        raise ValueError(f"response must be at most {MAX_RESPONSE_CHARS} characters")
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"response has unbalanced braces ({exc}); write {{{{ and }}}} for literal braces") from None
    for _, name, spec, conversion in fields:
        if name is None:
            continue
        if name not in RESPONSE_PLACEHOLDERS or spec or conversion:
            known = ", ".join("{" + p + "}" for p in sorted(RESPONSE_PLACEHOLDERS))
            raise ValueError(f"response placeholder {{{name}}} is not allowed; known placeholders: {known}")
    return template


def render_response(template: str, policy_name: str) -> str:
    """The reply a client receives: ``{policy}`` becomes the policy's name in words (``tax advice``)."""
    return template.format(policy=policy_name.replace("_", " "))


class PolicyExample(BaseModel):
    """A short example prompt with its label under the policy."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=2000)
    label: Label


class Policy(BaseModel):
    """A guardrail policy: what it forbids and allows, and where its decision threshold sits."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    name: str = Field(pattern=NAME_PATTERN, description="snake_case identifier")
    version: str = Field(default="1", max_length=32)
    description: str = Field(min_length=10, max_length=2000)
    allowed: list[str] = Field(default_factory=list, max_length=30)
    disallowed: list[str] = Field(min_length=1, max_length=30)
    examples: list[PolicyExample] = Field(default_factory=list, max_length=50)
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    enabled_by_default: bool = False
    group: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        description="a named set of policies a request may ask for at once (e.g. 'categories')",
    )
    response: str | None = Field(
        default=None,
        description="a short safe reply for a text this policy flags; placeholder {policy} (the name in words)",
    )
    category_group: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        description="a group whose policies name the categories of a text this policy flags (e.g. 'categories')",
    )

    @field_validator("allowed", "disallowed")
    @classmethod
    def _non_empty_items(cls, items: list[str]) -> list[str]:
        cleaned = [re.sub(r"\s+", " ", item).strip() for item in items]
        if any(not item for item in cleaned):
            raise ValueError("list items must be non-empty strings")
        if any(len(item) > 300 for item in cleaned):
            raise ValueError("list items must be at most 300 characters")
        return cleaned

    @field_validator("response")
    @classmethod
    def _response(cls, value: str | None) -> str | None:
        return None if value is None else check_response(value)

    def instruction_text(self) -> str:
        """The policy as the model reads it (examples are not part of it: they cost tokens)."""
        from policies.instruction import policy_text

        return policy_text(self)

    @property
    def content_hash(self) -> str:
        """A hash of the text the model reads; it changes whenever that text changes.

        Caches store scores keyed by it; thresholds are applied after the cache, so they are not
        part of it.
        """
        payload = f"{self.name}\x00{self.instruction_text()}"
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


class PolicyRef(BaseModel):
    """A policy as a model records it: the name, its content hash and the exact text it read."""

    model_config = ConfigDict(extra="forbid")

    name: str
    content_hash: str
    instruction_text: str

    @classmethod
    def of(cls, policy: Policy) -> PolicyRef:
        return cls(name=policy.name, content_hash=policy.content_hash, instruction_text=policy.instruction_text())


class DataSource(BaseModel):
    """Where training rows came from, for manifests and model cards."""

    model_config = ConfigDict(extra="forbid")

    source: str
    license: str
    policy: str
    rows: int
