"""Prefix mode: the grouped forward (policy encoded once, keys/values shared) equals the masked full forward."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from training.prefix import (
    PrefixGraph,
    encode_policies,
    gather_rows,
    masked_forward,
    prefix_adapter,
    query_forward,
)


@pytest.fixture(scope="module")
def model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=2
    )
    return BertForSequenceClassification(config).eval()


def _pad(rows: list[list[int]], value: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def _case() -> tuple[list[list[int]], list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(1)
    policies = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (7, 12, 4)]  # padded to 12
    queries = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (3, 9, 1, 6, 9)]
    return policies, queries, [0, 2, 1, 0, 2]


def _grouped(model: BertForSequenceClassification) -> tuple[torch.Tensor, list, torch.Tensor, torch.Tensor]:
    adapter = prefix_adapter(model)
    policies, queries, index = _case()
    p_ids, p_mask = _pad(policies)
    kv = encode_policies(adapter, p_ids, torch.zeros_like(p_ids), p_mask)
    q_ids, q_mask = _pad(queries)
    idx = torch.tensor(index)
    lengths = torch.tensor([len(policies[i]) for i in index])
    positions = lengths[:, None] + torch.arange(q_ids.shape[1])[None, :]
    with torch.no_grad():
        logits, _ = query_forward(
            adapter, q_ids, torch.ones_like(q_ids), positions, q_mask, gather_rows(kv, idx), p_mask.index_select(0, idx)
        )
    return logits, kv, p_ids, p_mask


def test_grouped_forward_equals_masked_full_sequence(model: BertForSequenceClassification) -> None:
    adapter = prefix_adapter(model)
    policies, queries, index = _case()
    logits, _, _, _ = _grouped(model)
    # The reference: each row's policy segment and query concatenated, block mask, padding at the end.
    rows = [policies[i] + q for i, q in zip(index, queries, strict=True)]
    ids, mask = _pad(rows)
    is_policy = torch.zeros_like(ids)
    types = torch.zeros_like(ids)
    for r, i in enumerate(index):
        is_policy[r, : len(policies[i])] = 1
        types[r, len(policies[i]) : len(rows[r])] = 1
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        reference = masked_forward(adapter, ids, types, positions, mask, is_policy)
    assert torch.allclose(logits, reference, atol=1e-5), (logits - reference).abs().max()
    # the query side really reads the policy: another policy gives other logits
    assert (logits[0] - logits[4]).abs().max() > 1e-3


def test_prefix_graph_scores_and_encodes_policies(model: BertForSequenceClassification) -> None:
    """The exported module: the bank as per-layer inputs gives the grouped logits; fed a policy segment with a
    masked one-slot bank, its present keys/values are the policy's."""
    logits, kv, p_ids, p_mask = _grouped(model)
    policies, queries, index = _case()
    graph = PrefixGraph(model).eval()
    from export.manifest import KVLayout

    layout = KVLayout(layers=2, heads=4, head_dim=8, max_policy_len=12)
    inputs, outputs = layout.input_names(), layout.output_names()
    assert inputs[4:8] == ["policy_key_0", "policy_value_0", "policy_key_1", "policy_value_1"]
    assert outputs == ["logits", "present_key_0", "present_value_0", "present_key_1", "present_value_1"]
    q_ids, q_mask = _pad(queries)
    lengths = torch.tensor([len(policies[i]) for i in index])
    positions = lengths[:, None] + torch.arange(q_ids.shape[1])[None, :]
    bank = [t for pair in kv for t in pair]
    with torch.no_grad():
        out = graph(q_ids, torch.ones_like(q_ids), positions, q_mask, *bank, p_mask, torch.tensor(index))
    assert torch.allclose(out[0], logits, atol=1e-6)

    empty = [torch.zeros(1, 4, 1, 8) for _ in range(4)]
    with torch.no_grad():
        enc = graph(
            p_ids,
            torch.zeros_like(p_ids),
            torch.arange(p_ids.shape[1]).expand_as(p_ids),
            p_mask,
            *empty,
            torch.zeros(1, 1, dtype=torch.long),
            torch.zeros(p_ids.shape[0], dtype=torch.long),
        )
    for layer in range(2):
        for kind in range(2):
            got, want = enc[1 + 2 * layer + kind], kv[layer][kind]
            valid = p_mask.bool()[:, None, :, None].expand_as(want)
            assert torch.allclose(got[valid], want[valid], atol=1e-5)


def test_no_adapter_is_a_clear_error() -> None:
    class Fake(torch.nn.Module):
        config = type("C", (), {"model_type": "mpnet"})()

    with pytest.raises(ValueError, match="no adapter for model type 'mpnet'"):
        prefix_adapter(Fake())


def test_prefix_windows_have_the_full_layout() -> None:
    """Same tokens, types and positions as full mode; the policy segment never shortens, so it is shared."""
    from tokenizers import Tokenizer

    from policies.instruction import InstructionEncoder
    from policies.registry import PolicyRegistry
    from tests.tinymodel import base_encoder_dir

    tokenizer = Tokenizer.from_file(str(base_encoder_dir() / "tokenizer.json"))
    full = InstructionEncoder(tokenizer, max_length=128, max_policy_tokens=48, min_policy_tokens=24)
    prefix = InstructionEncoder(tokenizer, max_length=128, max_policy_tokens=48, min_policy_tokens=24, mode="prefix")
    policy = PolicyRegistry.load()["toxicity"].instruction_text()
    (f,) = full.encode(policy, "How do I bake bread?")
    (p,) = prefix.encode(policy, "How do I bake bread?")
    assert p.policy is not None and p.position_start == len(p.policy) == 48 + 2  # [CLS] + 48 + [SEP]
    assert list(p.policy.input_ids) + p.input_ids == f.input_ids
    assert list(p.policy.token_type_ids) + p.token_type_ids == f.token_type_ids
    assert set(p.policy.token_type_ids) == {0} and set(p.token_type_ids) == {1}

    long_text = " ".join(f"Sentence {i} talks about the weather and the garden." for i in range(40))
    windows = prefix.encode(policy, long_text)
    assert len(windows) > len(full.encode(policy, long_text)) > 1  # the policy is never shortened for the prompt
    assert all(w.policy is p.policy for w in windows)  # one shared segment object (and key)
    assert all(len(w.policy) + len(w) <= 128 for w in windows if w.policy is not None)
    assert windows[0].char_start == 0 and windows[-1].char_end == len(long_text)
    other = prefix.policy_segment(PolicyRegistry.load()["tax_advice"].instruction_text())
    assert other.key != p.policy.key and prefix.policy_segment(policy) is p.policy
