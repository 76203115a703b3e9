"""Prefix mode in torch: the policy segment is encoded once, its keys/values serve every prompt under it.

Input layout (unchanged from full mode): ``[CLS] Instruct: <policy> [SEP]`` (token type 0, positions
0..P-1) then ``Query: <prompt> [SEP]`` (type 1, positions P..). Attention: policy positions attend
only to policy positions; query positions attend to every (unpadded) policy and query position. So
the policy's hidden states, and its keys and values at every layer, do not depend on the prompt.
Classification reads the query side only: the mean of the query segment's last hidden states, the
BERT pooler's dense + tanh, then the classifier. The parameters are exactly those of a Hugging Face
``BertForSequenceClassification`` (merging, ``save_pretrained`` and ``from_pretrained`` work
unchanged); the forward is ours, written on the model's own modules (an *architecture adapter*).

Three forwards, equal by construction (tested to 1e-5 in fp32):

- ``encode_policies``: policy segments ``[N, P]`` -> per layer (keys, values) ``[N, heads, P, head_dim]``;
- ``query_forward``: query tokens ``[B, Lq]`` with each row's policy keys/values (``gather_rows``) -> logits
  ``[B, 2]`` and the query tokens' own keys/values;
- ``masked_forward``: the reference, the concatenated sequence with the block attention mask above.

``PrefixGraph`` is the module exported to ONNX (``export.prefix``); it is ``query_forward`` with the
policy bank as an input, and encodes a policy when fed the policy segment with a masked one-slot bank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MASKED = -10000.0  # additive attention bias of a masked key: exp() underflows to exactly 0, finite in fp16
Perturb = Callable[[int, torch.Tensor], torch.Tensor]  # (layer index, query hidden states) -> perturbed states


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, dropout: nn.Module) -> torch.Tensor:
    """Scaled dot-product attention with an additive bias, ``[B, heads, L, head_dim]`` -> ``[B, L, hidden]``.

    torch's fused kernel (with the attention dropout when the model trains); under ONNX export the plain product
    (MatMul, Softmax: what ONNX Runtime runs and quantises well)."""
    if torch.onnx.is_in_onnx_export():
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + bias
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
    else:
        p = float(getattr(dropout, "p", 0.0)) if dropout.training else 0.0
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=p)
    ctx = ctx.transpose(1, 2)
    return ctx.reshape(ctx.shape[0], ctx.shape[1], ctx.shape[2] * ctx.shape[3])


class _SelfAttention(nn.Module):
    """The query/key/value projections of a Hugging Face ``BertSelfAttention`` (its own Linear modules)."""

    def __init__(self, hf: Any, heads: int) -> None:
        super().__init__()
        self.query, self.key, self.value, self.dropout = hf.query, hf.key, hf.value, hf.dropout
        self.heads = heads

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, width = x.shape
        return x.view(b, n, self.heads, width // self.heads).transpose(1, 2)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._split(self.query(h)), self._split(self.key(h)), self._split(self.value(h))


class _Attention(nn.Module):
    """Self-attention whose keys/values may be prefixed by another segment's (``past``), then the output projection."""

    def __init__(self, hf: Any, heads: int) -> None:
        super().__init__()
        self.add_module("self", _SelfAttention(hf.self, heads))  # the Hugging Face name: attention.self.query ...
        self.output = hf.output

    def forward(
        self, h: torch.Tensor, bias: torch.Tensor, past_k: torch.Tensor | None, past_v: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        projections: Any = self._modules["self"]
        q, k, v = projections(h)
        keys = k if past_k is None else torch.cat([past_k, k], dim=2)
        values = v if past_v is None else torch.cat([past_v, v], dim=2)
        return self.output(attend(q, keys, values, bias, projections.dropout), h), k, v


class _Layer(nn.Module):
    def __init__(self, hf: Any, heads: int) -> None:
        super().__init__()
        self.attention = _Attention(hf.attention, heads)
        self.intermediate, self.output = hf.intermediate, hf.output

    def forward(
        self,
        h: torch.Tensor,
        bias: torch.Tensor,
        past_k: torch.Tensor | None = None,
        past_v: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, k, v = self.attention(h, bias, past_k, past_v)
        return self.output(self.intermediate(a), a), k, v


class _Encoder(nn.Module):
    def __init__(self, hf: Any, heads: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(block, heads) for block in hf.layer)


class _Bert(nn.Module):
    def __init__(self, hf: Any, heads: int) -> None:
        super().__init__()
        self.embeddings = hf.embeddings
        self.encoder = _Encoder(hf.encoder, heads)
        self.pooler = hf.pooler


class BertPrefix(nn.Module):
    """The architecture adapter for BERT encoders (MiniLM, multilingual-e5): a module tree over the model's own
    modules under the Hugging Face names (``bert.encoder.layer.N.attention.self.query``, ``...output.dense``,
    ``classifier``), so state dicts are interchangeable and exported node names match (the int8 export keeps
    ``/layer.N/output/dense/MatMul`` in fp32 by name). No new parameters. An adapter gives embeddings, a layer
    with optional prefix keys/values, and the head; an MPNet adapter would add its relative position bias to the
    attention bias."""

    bert: Any
    dropout: Any
    classifier: Any

    def __init__(self, model: Any) -> None:
        super().__init__()
        config = model.config
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"prefix mode supports absolute positions, not {config.position_embedding_type!r}")
        self.n_layers = int(config.num_hidden_layers)
        self.n_heads = int(config.num_attention_heads)
        self.head_dim = int(config.hidden_size) // self.n_heads
        self.bert = _Bert(model.bert, self.n_heads)
        self.dropout = model.dropout
        self.classifier = model.classifier

    def embed(self, ids: torch.Tensor, types: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.bert.embeddings(input_ids=ids, token_type_ids=types, position_ids=positions)

    def layer(
        self,
        index: int,
        h: torch.Tensor,
        bias: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoder layer ``index``: new hidden states and this segment's own (keys, values) ``[B, heads, L, hd]``."""
        block = self.bert.encoder.layer[index]
        return block(h, bias, *(past if past is not None else (None, None)))

    def head(self, pooled_tokens: torch.Tensor) -> torch.Tensor:
        """Logits from the mean of the query segment's hidden states: pooler dense + tanh, dropout, classifier."""
        pooled = torch.tanh(self.bert.pooler.dense(pooled_tokens))
        return self.classifier(self.dropout(pooled))


ADAPTERS: dict[str, type[BertPrefix]] = {"bert": BertPrefix}


def prefix_adapter(model: Any) -> BertPrefix:
    """The adapter of a Hugging Face sequence classifier (BERT-architecture encoders)."""
    model_type = getattr(model.config, "model_type", "")
    if model_type not in ADAPTERS:
        raise ValueError(
            f"prefix mode has no adapter for model type {model_type!r} (supported: {', '.join(ADAPTERS)}); "
            "train it with --mode full"
        )
    return ADAPTERS[model_type](model)


def key_bias(mask: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` 1/0 key mask -> additive bias ``[B, 1, 1, K]``."""
    return ((1.0 - mask.to(torch.float32)) * MASKED)[:, None, None, :]


def mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def encode_policies(
    adapter: BertPrefix, ids: torch.Tensor, types: torch.Tensor, mask: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Policy segments ``[N, P]`` (right-padded, ``mask`` 1/0) -> per layer (keys, values) ``[N, heads, P, head_dim]``.

    Policy positions attend only to policy positions (positions 0..P-1)."""
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
    h = adapter.embed(ids, types, positions)
    bias = key_bias(mask)
    kv: list[tuple[torch.Tensor, torch.Tensor]] = []
    for layer in range(adapter.n_layers):
        h, k, v = adapter.layer(layer, h, bias)
        kv.append((k, v))
    return kv


def gather_rows(
    kv: Sequence[tuple[torch.Tensor, torch.Tensor]], index: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the (keys, values) of each row's policy: ``[B, heads, P, head_dim]`` (row b reads ``index[b]``)."""
    return [(k.index_select(0, index), v.index_select(0, index)) for k, v in kv]


def query_forward(
    adapter: BertPrefix,
    ids: torch.Tensor,
    types: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    rows_kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
    rows_policy_mask: torch.Tensor,
    perturb: Perturb | None = None,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Query tokens ``[B, Lq]`` against their policies' keys/values (``gather_rows``: per layer ``[B, heads, P,
    head_dim]``, with the policies' masks ``[B, P]``). Query positions attend to every unmasked policy position and
    every unmasked query position. ``perturb(layer, h)`` may replace the query hidden states after the embeddings
    (layer 0) or after encoder layer ``layer - 1`` (ALICE++; the policy states are shared and never perturbed).
    Returns the logits ``[B, 2]`` and per layer the query tokens' own (keys, values) ``[B, heads, Lq, head_dim]``."""
    h = adapter.embed(ids, types, positions)
    if perturb is not None:
        h = perturb(0, h)
    bias = torch.cat([key_bias(rows_policy_mask), key_bias(mask)], dim=-1)
    present: list[tuple[torch.Tensor, torch.Tensor]] = []
    for layer, past in enumerate(rows_kv):
        h, k, v = adapter.layer(layer, h, bias, past)
        if perturb is not None:
            h = perturb(layer + 1, h)
        present.append((k, v))
    return adapter.head(mean_pool(h, mask)), present


def batch_logits(
    adapter: BertPrefix,
    query: dict[str, torch.Tensor],
    segments: dict[str, torch.Tensor],
    index: torch.Tensor,
    kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    perturb: Perturb | None = None,
) -> torch.Tensor:
    """Logits of a padded prefix-mode batch (``scoring.core.pad_windows`` of the windows and of their distinct
    policy segments, ``index`` = each row's segment). ``kv``: the segments' keys/values when already encoded (the
    ALICE++ passes of a training step reuse them)."""
    if kv is None:
        kv = encode_policies(adapter, segments["input_ids"], segments["token_type_ids"], segments["attention_mask"])
    logits, _ = query_forward(
        adapter,
        query["input_ids"],
        query["token_type_ids"],
        query["position_ids"],
        query["attention_mask"],
        gather_rows(kv, index),
        segments["attention_mask"].index_select(0, index),
        perturb,
    )
    return logits


def masked_forward(
    adapter: BertPrefix,
    ids: torch.Tensor,
    types: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    is_policy: torch.Tensor,
) -> torch.Tensor:
    """The reference: whole sequences ``[B, T]`` with the block attention mask (policy tokens see only policy
    tokens, query tokens see everything unmasked), pooled over the query tokens."""
    visible = mask[:, None, :].bool() & (~is_policy[:, :, None].bool() | is_policy[:, None, :].bool())
    bias = ((~visible).to(torch.float32) * MASKED)[:, None, :, :]
    h = adapter.embed(ids, types, positions)
    for layer in range(adapter.n_layers):
        h, _, _ = adapter.layer(layer, h, bias)
    return adapter.head(mean_pool(h, mask * (~is_policy.bool()).to(mask.dtype)))


class PrefixGraph(nn.Module):
    """The module exported to ONNX: query tokens + a bank of policies -> logits and the query tokens' keys/values.

    Inputs: ``input_ids``, ``token_type_ids``, ``position_ids``, ``attention_mask`` ``[B, Lq]`` (int64); per layer
    ``policy_key_<l>`` and ``policy_value_<l>`` ``[N, heads, P, head_dim]`` (float32: a bank of N policies);
    ``policy_mask`` ``[N, P]`` and ``policy_index`` ``[B]`` (int64: row b reads policy ``policy_index[b]``).
    Outputs: ``logits`` ``[B, 2]``; per layer ``present_key_<l>``, ``present_value_<l>`` ``[B, heads, Lq, head_dim]``.
    One tensor per layer and kind (rather than one ``[layers, 2, N, ...]`` tensor) because a slice of a stacked
    bank is a copy in ONNX Runtime: this way the only copy is the gather of the batch's rows. Fed a policy segment
    (positions 0..P-1, type 0) with a one-slot, fully masked bank, ``present_*`` are that policy's keys/values."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.adapter = prefix_adapter(model)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ids, types, positions, mask = inputs[:4]
        n = self.adapter.n_layers
        bank = inputs[4 : 4 + 2 * n]
        policy_mask, policy_index = inputs[4 + 2 * n], inputs[5 + 2 * n]
        kv = [(bank[2 * layer], bank[2 * layer + 1]) for layer in range(n)]
        logits, present = query_forward(
            self.adapter,
            ids,
            types,
            positions,
            mask,
            gather_rows(kv, policy_index),
            policy_mask.index_select(0, policy_index),
        )
        return (logits, *(t for pair in present for t in pair))


def as_tensors(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """numpy arrays -> torch tensors (no copy)."""
    return {k: torch.from_numpy(v) for k, v in batch.items()}
