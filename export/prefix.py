"""Export a prefix-mode checkpoint: one ONNX graph, written by ``torch.onnx.export`` from ``PrefixGraph``.

The graph scores query tokens against a bank of policies' keys/values and returns the query tokens' own
keys/values; fed a policy segment against a masked one-slot bank it encodes that policy (see
``scoring.prefix``). So the int8 model stays one file. Module names follow Hugging Face's
(``.../encoder/layer.N/output/dense/MatMul``), so ``export.onnx.FP32_NODE_PATTERN`` keeps the same
feed-forward output projections in fp32 as for full-mode models.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from export.manifest import KVLayout

log = logging.getLogger("uniguard.export")

OPSET = 18


def kv_layout(checkpoint: Path, max_policy_len: int) -> KVLayout:
    import json

    config = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
    heads = int(config["num_attention_heads"])
    return KVLayout(
        layers=int(config["num_hidden_layers"]),
        heads=heads,
        head_dim=int(config["hidden_size"]) // heads,
        max_policy_len=max_policy_len,
    )


def export_prefix_raw(checkpoint: Path, work: Path, layout: KVLayout) -> Path:
    """``PrefixGraph`` of the checkpoint to ``work/model.onnx`` (fp32, dynamic batch, query, bank and policy axes)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForSequenceClassification

    from training.prefix import PrefixGraph

    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    graph = PrefixGraph(model).eval()
    inputs, outputs = layout.input_names(), layout.output_names()
    batch, query, policies, plen = 2, 5, 3, 7
    ids = torch.ones((batch, query), dtype=torch.long)
    bank = torch.zeros((policies, layout.heads, plen, layout.head_dim))
    dummy = (
        ids,
        ids,
        torch.arange(query).expand(batch, query) + plen,
        ids,
        *([bank] * (2 * layout.layers)),
        torch.ones((policies, plen), dtype=torch.long),
        torch.zeros(batch, dtype=torch.long),
    )
    axes: dict[str, dict[int, str]] = {name: {0: "batch", 1: "query"} for name in inputs[:4]}
    axes.update({name: {0: "policies", 2: "policy_len"} for name in inputs[4:-2]})
    axes["policy_mask"] = {0: "policies", 1: "policy_len"}
    axes["policy_index"] = {0: "batch"}
    axes["logits"] = {0: "batch"}
    axes.update({name: {0: "batch", 2: "query"} for name in outputs[1:]})
    work.mkdir(parents=True, exist_ok=True)
    path = work / "model.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic
        torch.onnx.export(
            graph,
            dummy,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    log.info("exported the prefix graph (%d layers, bank [policies, %d, P, %d])", layout.layers, layout.heads,
             layout.head_dim)  # fmt: skip
    return path
