"""Binary metrics with the unsafe class as the positive class, and threshold calibration.

Pure numpy: used by training (early stopping), evaluation, merging (search objective) and export
(parity gate).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel


class BinaryMetrics(BaseModel):
    precision: float
    recall: float
    f1: float
    fpr: float
    auroc: float | None
    support: int
    positives: int
    threshold: float


def _as_arrays(
    scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in shape: {s.shape} vs {y.shape}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (safe) or 1 (unsafe)")
    return s, y


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); None if one class."""
    s, y = _as_arrays(scores, labels)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < s.size:
        j = i
        while j + 1 < s.size and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def binary_metrics(
    scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, threshold: float = 0.5
) -> BinaryMetrics:
    """Precision, recall, F1, false-positive rate and AUROC of ``score >= threshold`` as unsafe."""
    s, y = _as_arrays(scores, labels)
    pred = s >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    tn = int(np.sum(~pred & (y == 0)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    fpr = fp / (fp + tn) if fp + tn else 0.0
    return BinaryMetrics(
        precision=precision,
        recall=recall,
        f1=f1,
        fpr=fpr,
        auroc=auroc(s, y),
        support=int(y.size),
        positives=int(y.sum()),
        threshold=threshold,
    )


def calibrate_threshold(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    target_fpr: float | None = None,
    default: float = 0.5,
    bounds: tuple[float, float] = (0.05, 0.95),
    objective: str = "f1",
) -> float:
    """The threshold with the best objective (or, with ``target_fpr``, the best recall within that FPR and,
    among equal recalls, the fewest false positives: never a lower threshold than the recall needs).

    Objectives: ``f1`` (F1 of the unsafe class) or ``balanced`` (the mean of the F1 of both
    classes, so false positives on safe prompts weigh as much as misses whatever the validation
    set's class mix). Candidates are midpoints between distinct scores, clipped to ``bounds`` so
    that a handful of validation rows cannot push a threshold to an extreme. With only one class
    present, returns ``default``.
    """
    if objective not in ("f1", "balanced"):
        raise ValueError(f"objective must be 'f1' or 'balanced', got {objective!r}")
    s, y = _as_arrays(scores, labels)
    if y.size == 0 or y.min() == y.max():
        return default
    uniq = np.unique(s)
    cands = np.concatenate([[default], (uniq[:-1] + uniq[1:]) / 2.0]) if uniq.size > 1 else np.array([default])
    cands = np.clip(cands, *bounds)
    best_t, best_key = default, (-1.0, 0.0, 0.0)
    for t in np.unique(cands):
        m = binary_metrics(s, y, float(t))
        if target_fpr is not None:
            if m.fpr > target_fpr:
                continue
            key: tuple[float, float, float] = (m.recall, -m.fpr, -abs(t - default))  # ties: fewer FPs, nearest default
        elif objective == "balanced":
            safe_f1 = binary_metrics(1.0 - s, 1 - y, 1.0 - float(t) + 1e-12).f1
            key = ((m.f1 + safe_f1) / 2.0, 0.0, -abs(t - default))
        else:
            key = (m.f1, 0.0, -abs(t - default))
        if key > best_key:
            best_t, best_key = float(t), key
    return best_t


def macro(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else 0.0
