"""The one instruction format, used by training, evaluation and the service alike.

Textual form (what a person reads, and what the manifest records)::

    Instruct: <policy text>
    Query: <prompt>

Encoded form (what the model reads): the tokenizer's own pair template, i.e. for BERT-style
encoders ``[CLS] Instruct: <policy text> [SEP] Query: <prompt> [SEP]`` with token type 0 for the
instruction and 1 for the query. The separator is the tokenizer's pair separator.

Token budget: the policy part is truncated (from its end) so the query fits; the query's start is
never cut. A query longer than the window is split into overlapping windows, each with the same
(possibly shortened) instruction, and each window knows the character span of the query it covers.

Two modes (``EncodingConfig.mode``), same tokens, positions and token types:

- ``full``: a window is the whole sequence; every token attends to every token.
- ``prefix``: a window is the query segment ``Query: <prompt> [SEP]`` (type 1, positions continuing
  after the policy) plus a reference to its ``PolicySegment`` ``[CLS] Instruct: <policy> [SEP]``
  (type 0, positions from 0). The policy segment is capped at ``max_policy_tokens`` once per policy
  and never shortened per prompt, so it is identical for every prompt and its keys/values can be
  computed once (policy tokens attend only to policy tokens). Long prompts are windowed within the
  remaining room, ``max_length`` minus the policy segment.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Literal, Protocol

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from policies.schema import Policy

INSTRUCT_PREFIX = "Instruct: "
QUERY_PREFIX = "Query: "
TEXT_SEPARATOR = "\n"
TEMPLATE = INSTRUCT_PREFIX + "{policy}" + TEXT_SEPARATOR + QUERY_PREFIX + "{query}"

DEFAULT_MAX_LENGTH = 256
DEFAULT_MAX_POLICY_TOKENS = 128
DEFAULT_MIN_POLICY_TOKENS = 48
DEFAULT_WINDOW_OVERLAP = 32
Mode = Literal["full", "prefix"]


class EncodingConfig(BaseModel):
    """How inputs are built; recorded with every checkpoint and manifest."""

    model_config = ConfigDict(extra="forbid")

    template: str = TEMPLATE
    max_length: int = DEFAULT_MAX_LENGTH
    max_policy_tokens: int = DEFAULT_MAX_POLICY_TOKENS
    min_policy_tokens: int = DEFAULT_MIN_POLICY_TOKENS
    window_overlap: int = DEFAULT_WINDOW_OVERLAP
    # "full": every token attends to every token (the 0.1/0.2 models); "prefix": the policy segment is encoded
    # once and only query tokens read it (see the module docstring).
    mode: Mode = "full"


class PolicyLike(Protocol):
    name: str
    description: str
    allowed: list[str]
    disallowed: list[str]


def policy_text(policy: PolicyLike | Policy) -> str:
    """The policy as the instruction states it: name, description, then unsafe and safe lists."""
    parts = [f"{policy.name.replace('_', ' ')}. {policy.description.strip()}"]
    if policy.disallowed:
        parts.append("Unsafe: " + "; ".join(policy.disallowed) + ".")
    if policy.allowed:
        parts.append("Safe: " + "; ".join(policy.allowed) + ".")
    return " ".join(parts)


def format_instruction(policy: str, query: str) -> str:
    """The textual instruction for a policy text and a prompt."""
    return TEMPLATE.format(policy=policy, query=query)


@dataclass(frozen=True)
class PolicySegment:
    """Prefix mode: ``[CLS] Instruct: <policy> [SEP]`` as token ids and types, the same for every prompt.

    ``key`` (a hash of the ids) names its cached keys/values."""

    input_ids: tuple[int, ...]
    token_type_ids: tuple[int, ...]
    key: str

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class Window:
    """One model input: a (possibly shortened) instruction with a span of the query.

    In prefix mode ``input_ids``/``token_type_ids`` hold the query segment only and ``policy`` the
    policy segment it reads; the query's positions start at ``len(policy)``."""

    input_ids: list[int]
    token_type_ids: list[int]
    char_start: int
    char_end: int
    policy: PolicySegment | None = None

    @property
    def attention_mask(self) -> list[int]:
        return [1] * len(self.input_ids)

    @property
    def position_start(self) -> int:
        return len(self.policy) if self.policy is not None else 0

    def __len__(self) -> int:
        return len(self.input_ids)


class _Encoding(Protocol):
    ids: list[int]
    offsets: list[tuple[int, int]]


class TokenizerLike(Protocol):
    """The subset of ``tokenizers.Tokenizer`` this module uses."""

    def encode(self, sequence: str, pair: str | None = None, add_special_tokens: bool = True) -> _Encoding: ...

    def encode_batch(self, inputs: list[str], add_special_tokens: bool = True) -> list[_Encoding]: ...

    def post_process(
        self, encoding: _Encoding, pair: _Encoding | None = None, add_special_tokens: bool = True
    ) -> _Encoding: ...


@dataclass(frozen=True)
class _PairTemplate:
    """Special tokens around and between the two parts, read off the tokenizer's post-processor."""

    prefix: list[int]
    middle: list[int]
    suffix: list[int]
    prefix_types: list[int]
    middle_types: list[int]
    suffix_types: list[int]
    first_type: int
    second_type: int

    @property
    def n_special(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)


def _pair_template(tokenizer: TokenizerLike) -> _PairTemplate:
    a = tokenizer.encode("a", add_special_tokens=False)
    b = tokenizer.encode("b", add_special_tokens=False)
    merged = tokenizer.post_process(a, b, add_special_tokens=True)
    ids: list[int] = list(merged.ids)
    types: list[int] = list(merged.type_ids)  # type: ignore[attr-defined]
    na, nb = len(a.ids), len(b.ids)
    for i in range(len(ids) - na + 1):
        if ids[i : i + na] != list(a.ids):
            continue
        for j in range(i + na, len(ids) - nb + 1):
            if ids[j : j + nb] == list(b.ids):
                return _PairTemplate(
                    prefix=ids[:i],
                    middle=ids[i + na : j],
                    suffix=ids[j + nb :],
                    prefix_types=types[:i],
                    middle_types=types[i + na : j],
                    suffix_types=types[j + nb :],
                    first_type=types[i],
                    second_type=types[j],
                )
    raise ValueError("cannot read the pair template off this tokenizer's post-processor")


def pad_id_of(tokenizer: TokenizerLike) -> int:
    """The tokenizer's pad id: its padding setting, else its ``[PAD]``/``<pad>`` token, else 0."""
    padding = getattr(tokenizer, "padding", None)
    if isinstance(padding, dict) and padding.get("pad_id") is not None:
        return int(padding["pad_id"])
    token_to_id = getattr(tokenizer, "token_to_id", None)
    for token in ("[PAD]", "<pad>"):
        found = token_to_id(token) if token_to_id is not None else None
        if found is not None:
            return int(found)
    return 0


class InstructionEncoder:
    """Builds model inputs for (policy text, query) pairs with the tokenizer's pair template."""

    def __init__(
        self,
        tokenizer: TokenizerLike,
        max_length: int = DEFAULT_MAX_LENGTH,
        max_policy_tokens: int = DEFAULT_MAX_POLICY_TOKENS,
        min_policy_tokens: int = DEFAULT_MIN_POLICY_TOKENS,
        window_overlap: int = DEFAULT_WINDOW_OVERLAP,
        mode: Mode = "full",
    ) -> None:
        self.pad_id = pad_id_of(tokenizer)
        self.mode = mode
        # Padding and truncation are ours to do: a tokenizer.json may carry its own settings.
        for method in ("no_padding", "no_truncation"):
            if hasattr(tokenizer, method):
                getattr(tokenizer, method)()
        self.tokenizer = tokenizer
        self.template = _pair_template(tokenizer)
        self.query_prefix_ids = list(tokenizer.encode(QUERY_PREFIX.strip(), add_special_tokens=False).ids)
        self.max_length = max_length
        self.max_policy_tokens = max_policy_tokens
        self.min_policy_tokens = min(min_policy_tokens, max_policy_tokens)
        budget = max_length - self.template.n_special - len(self.query_prefix_ids)
        # prefix mode never shortens the policy: the query gets what the longest policy segment leaves
        least = self.max_policy_tokens if mode == "prefix" else self.min_policy_tokens
        if budget - least < 16:
            raise ValueError(f"max_length={max_length} leaves no room for the query")
        self.window_overlap = min(window_overlap, (budget - least) // 2)
        self._policy_ids = lru_cache(maxsize=4096)(self._encode_policy)
        self._segments = lru_cache(maxsize=4096)(self._segment)

    def _encode_policy(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(INSTRUCT_PREFIX + text, add_special_tokens=False).ids)

    def policy_ids(self, text: str) -> tuple[int, ...]:
        """Token ids of ``Instruct: <policy text>`` (cached per text)."""
        return self._policy_ids(text)

    def _segment(self, policy: tuple[int, ...]) -> PolicySegment:
        t = self.template
        instr = list(policy[: self.max_policy_tokens])
        ids = tuple(t.prefix + instr + t.middle)
        types = tuple(t.prefix_types + [t.first_type] * len(instr) + t.middle_types)
        key = hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:24]
        return PolicySegment(input_ids=ids, token_type_ids=types, key=key)

    @property
    def max_segment_len(self) -> int:
        """Prefix mode: the longest policy segment (the special tokens around ``max_policy_tokens``)."""
        return len(self.template.prefix) + self.max_policy_tokens + len(self.template.middle)

    def policy_segment(self, text: str) -> PolicySegment:
        """Prefix mode: the policy segment of a policy text (cached), capped at ``max_policy_tokens``."""
        return self._segments(self.policy_ids(text))

    def tokenize_queries(self, queries: list[str]) -> list[_Encoding]:
        """Tokenize prompts once; the result is reused for every policy."""
        return self.tokenizer.encode_batch(list(queries), add_special_tokens=False)

    def windows(self, policy: tuple[int, ...] | list[int], query: _Encoding, query_text: str) -> list[Window]:
        """All windows for one (policy, query) pair; one window unless the query is too long."""
        q_ids = list(query.ids)
        offsets = list(query.offsets)
        room = self.max_length - self.template.n_special - len(self.query_prefix_ids)
        n_policy = min(len(policy), self.max_policy_tokens)
        segment: PolicySegment | None = None
        if self.mode == "prefix":
            segment = self._segments(tuple(policy))
        elif len(q_ids) > room - n_policy:
            n_policy = min(n_policy, max(self.min_policy_tokens, room - len(q_ids)))
        width = room - n_policy
        instr = list(policy[:n_policy])
        if len(q_ids) <= width:
            return [self._assemble(instr, q_ids, 0, len(query_text), segment)]
        step = width - self.window_overlap
        out: list[Window] = []
        start = 0
        while True:
            end = min(start + width, len(q_ids))
            char_start = offsets[start][0]
            char_end = offsets[end - 1][1]
            out.append(self._assemble(instr, q_ids[start:end], char_start, char_end, segment))
            if end >= len(q_ids):
                return out
            start += step

    def encode(self, policy_text_: str, query: str) -> list[Window]:
        """Windows for one policy text and one prompt."""
        enc = self.tokenize_queries([query])[0]
        return self.windows(self.policy_ids(policy_text_), enc, query)

    def _assemble(
        self, instr: list[int], q_ids: list[int], char_start: int, char_end: int, segment: PolicySegment | None
    ) -> Window:
        t = self.template
        second = self.query_prefix_ids + q_ids
        if segment is not None:  # prefix mode: the query segment, reading the policy segment
            types = [t.second_type] * len(second) + t.suffix_types
            return Window(second + t.suffix, types, char_start, char_end, policy=segment)
        ids = t.prefix + instr + t.middle + second + t.suffix
        types = (
            t.prefix_types
            + [t.first_type] * len(instr)
            + t.middle_types
            + [t.second_type] * len(second)
            + t.suffix_types
        )
        return Window(input_ids=ids, token_type_ids=types, char_start=char_start, char_end=char_end)


def encoder_from_config(tokenizer: TokenizerLike, config: EncodingConfig) -> InstructionEncoder:
    """The encoder a checkpoint or manifest describes."""
    if config.template != TEMPLATE:
        raise ValueError(f"model was built with instruction template {config.template!r}, this code uses {TEMPLATE!r}")
    return InstructionEncoder(
        tokenizer,
        max_length=config.max_length,
        max_policy_tokens=config.max_policy_tokens,
        min_policy_tokens=config.min_policy_tokens,
        window_overlap=config.window_overlap,
        mode=config.mode,
    )
