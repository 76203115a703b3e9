"""Policy registry validation and error messages; the instruction format, truncation and windows."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from policies.instruction import (
    EncodingConfig,
    InstructionEncoder,
    encoder_from_config,
    format_instruction,
    policy_text,
)
from policies.registry import DEFAULT_POLICY_DIR, PolicyError, PolicyRegistry, load_policy_file
from policies.schema import Policy, PolicyRef
from tests.tinymodel import base_encoder_dir

GOOD = """name: {name}
description: Flags requests about {name} that the operator does not want answered.
disallowed: [asking for {name} tips]
allowed: [general questions]
threshold: 0.4
"""


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(base_encoder_dir() / "tokenizer.json"))


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_load_with_five_policies() -> None:
    registry = PolicyRegistry.load()
    assert set(registry.names) >= {"prompt_injection", "toxicity", "content_safety", "financial_advice", "tax_advice"}
    assert {p.name for p in registry.defaults()} <= set(registry.names)
    for policy in registry:
        assert policy.disallowed and policy.description
        assert 0.0 <= policy.threshold <= 1.0


def test_user_folder_adds_policies(tmp_path: Path) -> None:
    write(tmp_path, "gaming.yaml", GOOD.format(name="gaming"))
    registry = PolicyRegistry.load([tmp_path])
    assert "gaming" in registry
    assert registry["gaming"].threshold == 0.4
    only = PolicyRegistry.load([tmp_path], include_default=False)
    assert only.names == ["gaming"]


def test_invalid_policy_message_names_file_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", "name: bad\ndescription: too short\n")
    with pytest.raises(PolicyError) as exc:
        load_policy_file(path)
    assert str(path) in str(exc.value)
    assert "disallowed" in str(exc.value) or "description" in str(exc.value)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("- just\n- a list\n", "mapping"),
        ("name: Bad-Name\ndescription: a valid long description\ndisallowed: [x]\n", "name"),
        ("name: ok_name\ndescription: a valid long description\ndisallowed: [x]\nthreshold: 2\n", "threshold"),
        ("name: ok_name\ndescription: a valid long description\ndisallowed: [x]\ncolour: red\n", "colour"),
        ("name: [unclosed\n", "cannot read"),
    ],
)
def test_invalid_policies_rejected(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, "p.yaml", text)
    with pytest.raises(PolicyError, match=needle) as exc:
        PolicyRegistry.load([tmp_path])
    assert str(path) in str(exc.value)


def test_duplicate_names_name_both_files(tmp_path: Path) -> None:
    first = write(tmp_path / "a", "x.yaml", GOOD.format(name="dup_policy"))
    second = write(tmp_path / "b", "y.yaml", GOOD.format(name="dup_policy"))
    with pytest.raises(PolicyError) as exc:
        PolicyRegistry.load([tmp_path / "a", tmp_path / "b"])
    assert str(second) in str(exc.value) and str(first) in str(exc.value)
    clash = write(tmp_path / "c", "z.yaml", GOOD.format(name="toxicity"))
    with pytest.raises(PolicyError, match="duplicate"):
        PolicyRegistry.load([clash.parent])


def test_missing_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="does not exist"):
        PolicyRegistry.load([tmp_path / "nope"])


def test_instruction_text_and_hash() -> None:
    policy = Policy.model_validate(
        {"name": "tax_help", "description": "Flags personal tax advice.", "disallowed": ["a", "b"], "allowed": ["c"]}
    )
    text = policy.instruction_text()
    assert text == policy_text(policy)
    assert text.startswith("tax help. Flags personal tax advice.")
    assert "Unsafe: a; b." in text and "Safe: c." in text
    assert format_instruction(text, "my query") == f"Instruct: {text}\nQuery: my query"
    same_text = policy.model_copy(update={"threshold": 0.9, "version": "2"})
    assert same_text.content_hash == policy.content_hash  # thresholds are not part of the text
    changed = policy.model_copy(update={"allowed": ["c", "d"]})
    assert changed.content_hash != policy.content_hash
    ref = PolicyRef.of(policy)
    assert ref.content_hash == policy.content_hash and ref.instruction_text == text


def test_encoding_types_and_query_start_kept(tokenizer: Tokenizer) -> None:
    enc = InstructionEncoder(tokenizer, max_length=64, max_policy_tokens=24, min_policy_tokens=8, window_overlap=8)
    long_policy = "word " * 200
    windows = enc.encode(long_policy, "hello there")
    assert len(windows) == 1
    w = windows[0]
    assert len(w) <= 64
    decoded = tokenizer.decode(w.input_ids)
    assert decoded.endswith("query : hello there")  # the query is whole, the policy cut
    n_instruct = len(enc.policy_ids(""))  # the "Instruct:" prefix
    assert w.input_ids.count(tokenizer.token_to_id("word")) == 24 - n_instruct
    n_policy = sum(1 for t in w.token_type_ids if t == 0)
    assert n_policy <= 24 + 2  # [CLS] + policy + [SEP]
    assert w.token_type_ids[-1] == 1 and w.token_type_ids[0] == 0
    assert w.attention_mask == [1] * len(w)


def test_policy_truncated_before_query(tokenizer: Tokenizer) -> None:
    enc = InstructionEncoder(tokenizer, max_length=64, max_policy_tokens=40, min_policy_tokens=8, window_overlap=8)
    policy = "alpha " * 100
    query = " ".join(f"q{i}" for i in range(12))
    w = enc.encode(policy, query)[0]
    q_ids = enc.tokenize_queries([query])[0].ids
    assert w.input_ids[-len(q_ids) - 1 : -1] == list(q_ids)  # the whole query before the final [SEP]
    assert len(w) == 64  # policy shrunk just enough


def test_long_query_windows_cover_text(tokenizer: Tokenizer) -> None:
    enc = InstructionEncoder(tokenizer, max_length=48, max_policy_tokens=16, min_policy_tokens=8, window_overlap=6)
    query = " ".join(f"token{i}" for i in range(120))
    windows = enc.encode("a short policy", query)
    assert len(windows) > 2
    assert windows[0].char_start == 0 and windows[-1].char_end == len(query)
    for a, b in itertools.pairwise(windows):
        assert b.char_start < a.char_end  # overlapping spans
        assert b.char_start > a.char_start
    assert all(len(w) <= 48 for w in windows)
    first_policy = [i for i, t in zip(windows[0].input_ids, windows[0].token_type_ids, strict=True) if t == 0]
    assert all(
        [i for i, t in zip(w.input_ids, w.token_type_ids, strict=True) if t == 0] == first_policy for w in windows
    )


def test_encoder_from_config_rejects_other_template(tokenizer: Tokenizer) -> None:
    enc = encoder_from_config(tokenizer, EncodingConfig())
    assert enc.max_length == 256
    with pytest.raises(ValueError, match="template"):
        encoder_from_config(tokenizer, EncodingConfig(template="{policy} || {query}"))


def test_default_yaml_files_are_valid() -> None:
    files = sorted(DEFAULT_POLICY_DIR.glob("*.yaml"))
    assert len(files) == 5
    for path in files:
        assert load_policy_file(path).name == path.stem


def test_one_threshold_rule_follows_the_policy_text_not_the_name() -> None:
    """A calibrated threshold applies only to the exact text it was calibrated on; then the file's explicit
    threshold; then the model's default (zero-shot)."""
    from dataclasses import dataclass, field

    from policies.schema import PolicyRef
    from policies.thresholds import policy_threshold

    registry = PolicyRegistry.load()
    tox = registry["toxicity"]

    @dataclass
    class Model:
        thresholds: dict[str, float]
        default_threshold: float = 0.3
        policies: list[PolicyRef] = field(default_factory=list)

    model = Model({"toxicity": 0.42}, policies=[PolicyRef.of(tox)])
    assert policy_threshold(tox, model) == 0.42
    edited = tox.model_copy(update={"description": tox.description + " Also rude emoji."})
    assert edited.content_hash != tox.content_hash
    assert policy_threshold(edited, model) == tox.threshold  # the file sets threshold: 0.5 explicitly
    implicit = Policy(name="toxicity", description=edited.description, disallowed=edited.disallowed)
    assert policy_threshold(implicit, model) == 0.3  # nothing explicit: the model's zero-shot default
    assert policy_threshold(tox, None) == tox.threshold
