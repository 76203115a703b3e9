"""Prompts and strict answer schemas for ``uniguard synth``.

Three prompts, all asking for one JSON object:

- generation: an instruction derived from the policy (name, description, disallowed, allowed, examples) asking for a
  fixed number of unsafe and safe user prompts in diverse styles, lengths, languages and personas, including hard
  cases (hard negatives: the same topic, allowed; subtle or disguised violations), each with a rationale;
- review: the generator re-judges a sample of its own items against the policy, without seeing its labels;
- rewrite: the generator proposes clearer policy wording from the items the review disagreed on.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from policies.labels import Label
from policies.schema import Policy

GENERATE_SYSTEM = (
    "You generate labelled training data for a guardrail classifier. You write realistic user prompts that an AI "
    "assistant might receive, some that violate a written policy and some that comply with it, and you answer with "
    "one JSON object only."
)
REVIEW_SYSTEM = (
    "You review labelled training data for a guardrail classifier. You judge each user prompt strictly against the "
    "written policy, and you answer with one JSON object only."
)
REWRITE_SYSTEM = "You rewrite guardrail policies so that they are unambiguous. You answer with one JSON object only."

PERSONAS = [
    "a student",
    "a retiree",
    "a small-business owner",
    "a software developer",
    "a parent",
    "a journalist",
    "a non-native speaker",
    "a teenager",
    "a nurse",
    "a lawyer",
    "a curious researcher",
    "an angry customer",
    "a role-play game player",
    "someone in a hurry",
    "a non-technical office worker",
    "a tester probing limits",
]
STYLES = [
    "casual chat with typos",
    "formal request",
    "terse command",
    "long story with context first",
    "question embedded in a role-play",
    "bullet list",
    "indirect or hypothetical framing",
    "follow-up question",
    "polite email-like message",
    "slang",
    "step-by-step request",
    "question with a fake justification",
]
LENGTHS = ["a few words", "one sentence", "two or three sentences", "a paragraph"]


class GeneratedItem(BaseModel):
    """One generated prompt. Strict types: a label other than exactly 'safe'/'unsafe' makes the item invalid."""

    model_config = ConfigDict(strict=True, extra="ignore", str_strip_whitespace=True)

    text: str = Field(min_length=3, max_length=4000)
    label: Label
    category: str | None = Field(default=None, max_length=80)
    lang: str = Field(pattern=r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})?$")
    rationale: str = Field(min_length=3, max_length=1000)


class Verdict(BaseModel):
    """One review verdict for the item with this id."""

    model_config = ConfigDict(strict=True, extra="ignore", str_strip_whitespace=True)

    id: int = Field(ge=0)
    label: Label
    reason: str = Field(default="", max_length=1000)


class PolicyProposal(BaseModel):
    """The rewrite answer: clearer wording for the policy's description and lists."""

    model_config = ConfigDict(strict=True, extra="ignore", str_strip_whitespace=True)

    description: str = Field(min_length=10, max_length=2000)
    allowed: list[str] = Field(default_factory=list, max_length=30)
    disallowed: list[str] = Field(min_length=1, max_length=30)
    changes: list[str] = Field(default_factory=list, max_length=30)


class MalformedAnswer(ValueError):
    """The answer is not the JSON object the prompt asked for (the call is retried)."""


def parse_json_object(content: str | None) -> dict[str, Any]:
    """Parse an answer that must be one JSON object; tolerates a Markdown code fence around it."""
    if content is None or not content.strip():
        raise MalformedAnswer("empty answer")
    text = content.strip()
    fence = re.fullmatch(r"```(?:json|JSON)?\s*(.*?)\s*```", text, flags=re.DOTALL)
    if fence:
        text = fence.group(1)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedAnswer(f"not valid JSON ({exc.msg} at char {exc.pos})") from exc
    if not isinstance(value, dict):
        raise MalformedAnswer(f"expected a JSON object, got {type(value).__name__}")
    return value


def parse_generation(content: str | None) -> tuple[list[GeneratedItem], int]:
    """The valid items of a generation answer and the number of invalid ones (dropped)."""
    value = parse_json_object(content)
    raw_items = value.get("items")
    if not isinstance(raw_items, list):
        raise MalformedAnswer('expected {"items": [...]}')
    items: list[GeneratedItem] = []
    invalid = 0
    for raw in raw_items:
        try:
            items.append(GeneratedItem.model_validate(raw))
        except ValidationError:
            invalid += 1
    return items, invalid


def parse_review(content: str | None, ids: set[int]) -> tuple[dict[int, Verdict], int]:
    """Verdicts by item id (unknown ids and invalid entries dropped and counted)."""
    value = parse_json_object(content)
    raw_verdicts = value.get("verdicts")
    if not isinstance(raw_verdicts, list):
        raise MalformedAnswer('expected {"verdicts": [...]}')
    verdicts: dict[int, Verdict] = {}
    invalid = 0
    for raw in raw_verdicts:
        try:
            verdict = Verdict.model_validate(raw)
        except ValidationError:
            invalid += 1
            continue
        if verdict.id not in ids or verdict.id in verdicts:
            invalid += 1
            continue
        verdicts[verdict.id] = verdict
    return verdicts, invalid


def parse_policy_proposal(content: str | None, policy: Policy) -> tuple[Policy, list[str]]:
    """The refined policy (validated with the Policy schema) and the list of changes the model gave."""
    value = parse_json_object(content)
    try:
        proposal = PolicyProposal.model_validate(value)
        refined = Policy.model_validate(
            {
                **policy.model_dump(),
                "version": f"{policy.version}-refined"[:32],
                "description": proposal.description,
                "allowed": proposal.allowed,
                "disallowed": proposal.disallowed,
            }
        )
    except ValidationError as exc:
        raise MalformedAnswer(f"refined policy is invalid: {exc.errors()[0]['msg']}") from exc
    return refined, proposal.changes


def _policy_block(policy: Policy) -> str:
    lines = [f"Policy name: {policy.name}", f"Description: {policy.description}", "Disallowed (label 'unsafe'):"]
    lines += [f"- {item}" for item in policy.disallowed]
    if policy.allowed:
        lines.append("Allowed (label 'safe'):")
        lines += [f"- {item}" for item in policy.allowed]
    return "\n".join(lines)


def diversity_hints(request_index: int, seed: int, languages: list[str]) -> str:
    """A different mix of personas, styles, lengths and languages for each request (deterministic)."""
    rng = random.Random(f"{seed}:{request_index}")
    personas = ", ".join(rng.sample(PERSONAS, 3))
    styles = ", ".join(rng.sample(STYLES, 3))
    main, others = languages[0], languages[1:]
    lang = f"mostly language '{main}'"
    if others:
        lang += f", plus at least one item in {', '.join(repr(x) for x in rng.sample(others, min(2, len(others))))}"
    return (
        f"For this batch: write as {personas}; use styles such as {styles}; vary lengths from "
        f"{LENGTHS[0]} to {LENGTHS[-1]}; {lang}."
    )


def generation_messages(
    policy: Policy, n_unsafe: int, n_safe: int, hints: str, avoid: list[str] | None = None
) -> list[dict[str, str]]:
    """The generation prompt: the policy, the label counts, diversity and hard-case instructions, the JSON schema."""
    examples = "\n".join(f"- [{ex.label}] {ex.text}" for ex in policy.examples[:8])
    parts = [
        _policy_block(policy),
        f"Examples:\n{examples}" if examples else "",
        f"Write exactly {n_unsafe} unsafe and {n_safe} safe user prompts for this policy.",
        "- unsafe: the prompt asks for something the policy disallows. Include subtle cases: indirect wording, "
        "role-play or hypothetical framing, a harmless-looking pretext, several requests with one violating.",
        "- safe: the prompt complies with the policy. At least a third must be hard negatives: the same topic and "
        "vocabulary as the disallowed items but clearly allowed (e.g. general education, history, fiction, "
        "how to get professional help). The rest can be ordinary, unrelated requests.",
        "- Make every prompt different from the others and from the examples: different intents, personas, "
        "styles, lengths and languages. Do not number them or reuse templates.",
        f"- {hints}",
        "- category: a short snake_case tag (for unsafe: which disallowed rule it breaks; for safe: "
        "'hard_negative' or 'benign'). lang: ISO 639-1 code of the prompt's language. rationale: one sentence on "
        "why the label is right under the policy.",
    ]
    if avoid:
        parts.append("Do not repeat or paraphrase these earlier prompts:\n" + "\n".join(f"- {t[:200]}" for t in avoid))
    parts.append(
        'Answer with one JSON object: {"items": [{"text": "...", "label": "unsafe" | "safe", "category": "...", '
        '"lang": "en", "rationale": "..."}]}'
    )
    return [
        {"role": "system", "content": GENERATE_SYSTEM},
        {"role": "user", "content": "\n\n".join(p for p in parts if p)},
    ]


def review_messages(policy: Policy, texts: list[tuple[int, str]]) -> list[dict[str, str]]:
    """The self-reflection prompt: judge each prompt against the policy (the generated labels are not shown)."""
    items = json.dumps([{"id": i, "text": t} for i, t in texts], ensure_ascii=False, indent=1)
    content = "\n\n".join(
        [
            _policy_block(policy),
            "Judge each user prompt below against this policy only: 'unsafe' if it asks for something the policy "
            "disallows, otherwise 'safe'. Prompts on the same topic that the policy allows are 'safe'.",
            f"Prompts:\n```json\n{items}\n```",
            'Answer with one JSON object: {"verdicts": [{"id": 0, "label": "unsafe" | "safe", '
            '"reason": "one sentence"}]} with one verdict per prompt id.',
        ]
    )
    return [{"role": "system", "content": REVIEW_SYSTEM}, {"role": "user", "content": content}]


def rewrite_messages(
    policy: Policy, disagreements: list[dict[str, str]], agreed: list[dict[str, str]]
) -> list[dict[str, str]]:
    """The refinement prompt: propose clearer wording, given where the first labels and the review disagreed."""
    disputed = json.dumps(disagreements, ensure_ascii=False, indent=1) if disagreements else "[]"
    clear = json.dumps(agreed, ensure_ascii=False, indent=1) if agreed else "[]"
    content = "\n\n".join(
        [
            _policy_block(policy),
            "A data generator labelled prompts under this policy and a reviewer re-judged them. The prompts where "
            "they disagreed show where the wording is ambiguous:",
            f"Disagreements:\n```json\n{disputed}\n```",
            f"Some prompts where they agreed:\n```json\n{clear}\n```",
            "Rewrite the policy so that every one of these prompts gets the reviewer's label without doubt. Keep its "
            "intent and scope; make the description precise (at least one full sentence); keep each list item "
            "short, concrete and non-overlapping (at most 30 items each, at most 300 characters each).",
            'Answer with one JSON object: {"description": "...", "disallowed": ["..."], "allowed": ["..."], '
            '"changes": ["what you changed and why"]}',
        ]
    )
    return [{"role": "system", "content": REWRITE_SYSTEM}, {"role": "user", "content": content}]
