"""Scoring (policy text, query) pairs with a torch checkpoint, windows and all.

``TorchScorer.score_pairs`` has the same contract as the service engine's: one score per pair,
the maximum over the query's windows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from policies.instruction import InstructionEncoder, Window, encoder_from_config
from training.meta import CheckpointMeta


@dataclass(frozen=True)
class PairScore:
    score: float
    char_start: int
    char_end: int


def pad_windows(windows: Sequence[Window], pad_id: int = 0) -> dict[str, np.ndarray]:
    """Right-pad a batch of windows to its longest one."""
    width = max(len(w) for w in windows)
    ids = np.full((len(windows), width), pad_id, dtype=np.int64)
    types = np.zeros((len(windows), width), dtype=np.int64)
    mask = np.zeros((len(windows), width), dtype=np.int64)
    for i, w in enumerate(windows):
        ids[i, : len(w)] = w.input_ids
        types[i, : len(w)] = w.token_type_ids
        mask[i, : len(w)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def pair_windows(encoder: InstructionEncoder, pairs: Sequence[tuple[str, str]]) -> list[list[Window]]:
    """Windows for every pair; each distinct query is tokenized once."""
    texts = sorted({q for _, q in pairs})
    encodings = dict(zip(texts, encoder.tokenize_queries(texts), strict=True))
    return [encoder.windows(encoder.policy_ids(p), encodings[q], q) for p, q in pairs]


def score_windows(
    windows: list[list[Window]],
    run_batch: Any,
    batch_size: int = 32,
) -> list[PairScore]:
    """Score all windows in length-sorted batches with ``run_batch(inputs) -> P(unsafe)``; max per pair."""
    flat = [(i, w) for i, ws in enumerate(windows) for w in ws]
    flat.sort(key=lambda item: len(item[1]))
    best: list[PairScore | None] = [None] * len(windows)
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        probs = run_batch(pad_windows([w for _, w in chunk]))
        for (i, w), p in zip(chunk, probs, strict=True):
            current = best[i]
            if current is None or float(p) > current.score:
                best[i] = PairScore(float(p), w.char_start, w.char_end)
    return [b if b is not None else PairScore(0.0, 0, 0) for b in best]


class TorchScorer:
    """A checkpoint folder (or an in-memory model) scored with torch on the CPU."""

    def __init__(self, model: Any, encoder: InstructionEncoder, meta: CheckpointMeta | None = None) -> None:
        self.model = model
        self.encoder = encoder
        self.meta = meta

    @classmethod
    def load(cls, folder: Path, threads: int | None = None) -> TorchScorer:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoModelForSequenceClassification

        if threads:
            torch.set_num_threads(threads)
        meta = CheckpointMeta.load(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        model.eval()
        tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        return cls(model, encoder_from_config(tokenizer, meta.encoding), meta)

    def run_batch(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            logits = self.model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits
            return torch.softmax(logits.float(), dim=-1)[:, 1].numpy()

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int = 32) -> list[PairScore]:
        return score_windows(pair_windows(self.encoder, pairs), self.run_batch, batch_size)
