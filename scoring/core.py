"""Windows -> P(unsafe) -> one score per (policy, text) pair: the one definition, for every stage.

The instruction format and the windows come from ``policies.instruction``; this module pads windows
with the tokenizer's pad id, orders them by length into batches, turns logits into P(unsafe) and
aggregates a pair's windows (max over windows, with the best window's character span). A
``Backend`` turns one batch of windows into P(unsafe): ONNX Runtime (``scoring.onnx``: serving,
the export parity gate, evaluation of exported models) or torch (``training.predict``: training
evaluation, the merge objective, evaluation of checkpoints). numpy only: no torch here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from policies.instruction import InstructionEncoder, PolicySegment, Window

Progress = Callable[[int], None]  # called with the number of windows just scored


@dataclass(frozen=True)
class PairScore:
    """The score of one (policy, text) pair: the max over windows, with the best window's character span."""

    score: float
    char_start: int
    char_end: int
    windows: int = 1
    tokens: int = 0


class Backend(Protocol):
    """A model that scores one batch of windows: P(unsafe) per window, in order."""

    def infer(self, windows: Sequence[Window]) -> np.ndarray: ...


def softmax_unsafe(logits: np.ndarray) -> np.ndarray:
    """P(unsafe) = softmax(logits)[:, 1] (label index 1 is unsafe), computed stably in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e[:, 1] / e.sum(axis=1))


def pad_windows(windows: Sequence[Window | PolicySegment], pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad a batch of windows (or policy segments) to the longest with the tokenizer's pad id (int64 arrays).

    ``position_ids`` start at each window's ``position_start`` (after its policy segment in prefix mode, else 0)."""
    width = max(len(w) for w in windows)
    n = len(windows)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    types = np.zeros((n, width), dtype=np.int64)
    positions = np.zeros((n, width), dtype=np.int64)
    for i, w in enumerate(windows):
        k = len(w)
        ids[i, :k] = w.input_ids
        mask[i, :k] = 1
        types[i, :k] = w.token_type_ids
        positions[i, :k] = np.arange(k) + (w.position_start if isinstance(w, Window) else 0)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "position_ids": positions}


def policy_rows(windows: Sequence[Window]) -> tuple[list[PolicySegment], np.ndarray]:
    """Prefix mode: the distinct policy segments of a batch (first-seen order) and each window's index into them."""
    order: dict[str, int] = {}
    segments: list[PolicySegment] = []
    index = np.zeros(len(windows), dtype=np.int64)
    for i, w in enumerate(windows):
        if w.policy is None:
            raise ValueError("a full-mode window in a prefix-mode batch")
        if w.policy.key not in order:
            order[w.policy.key] = len(segments)
            segments.append(w.policy)
        index[i] = order[w.policy.key]
    return segments, index


def length_batches(windows: Sequence[Window], batch_size: int) -> list[list[int]]:
    """Indices of ``windows`` sorted by length (stable) and cut into batches: little padding per batch."""
    order = sorted(range(len(windows)), key=lambda k: len(windows[k]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def aggregate(per_pair: Sequence[Sequence[Window]], flat_scores: Sequence[float]) -> list[PairScore]:
    """Max over each pair's windows (scores in the order of the flattened windows); ties: the first window."""
    out: list[PairScore] = []
    k = 0
    for windows in per_pair:
        best, best_j = -1.0, 0
        for j in range(len(windows)):
            if flat_scores[k + j] > best:
                best, best_j = float(flat_scores[k + j]), j
        w = windows[best_j]
        out.append(
            PairScore(
                score=best,
                char_start=w.char_start,
                char_end=w.char_end,
                windows=len(windows),
                tokens=sum(len(x) for x in windows),
            )
        )
        k += len(windows)
    return out


def pair_windows(encoder: InstructionEncoder, pairs: Sequence[tuple[str, str]]) -> list[list[Window]]:
    """The windows of every (policy instruction text, query) pair; each distinct query is tokenized once."""
    texts = list(dict.fromkeys(q for _, q in pairs))
    encodings = dict(zip(texts, encoder.tokenize_queries(texts), strict=True))
    return [encoder.windows(encoder.policy_ids(p), encodings[q], q) for p, q in pairs]


class Scorer:
    """An encoder and a backend: scores (policy instruction text, query) pairs, long queries windowed."""

    def __init__(self, encoder: InstructionEncoder, backend: Backend) -> None:
        self.encoder = encoder
        self.backend = backend

    def pair_windows(self, pairs: Sequence[tuple[str, str]]) -> list[list[Window]]:
        return pair_windows(self.encoder, pairs)

    def infer(self, windows: Sequence[Window]) -> np.ndarray:
        """P(unsafe) for one batch of windows."""
        if not windows:
            return np.zeros((0,), dtype=np.float64)
        return np.asarray(self.backend.infer(windows), dtype=np.float64)

    def score_windows(
        self, per_pair: Sequence[Sequence[Window]], batch_size: int = 32, progress: Progress | None = None
    ) -> list[PairScore]:
        """Score every window in length-ordered batches; one ``PairScore`` per pair (max over its windows)."""
        flat = [w for ws in per_pair for w in ws]
        scores = np.zeros(len(flat), dtype=np.float64)
        for batch in length_batches(flat, batch_size):
            scores[batch] = self.infer([flat[k] for k in batch])
            if progress is not None:
                progress(len(batch))
        return aggregate(per_pair, scores.tolist())

    def score_pairs(
        self, pairs: Sequence[tuple[str, str]], batch_size: int = 32, progress: Progress | None = None
    ) -> list[PairScore]:
        """Score (policy instruction text, query) pairs; score = max over the query's windows."""
        return self.score_windows(self.pair_windows(pairs), batch_size, progress)
