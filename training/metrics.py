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
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # 1-based rank of each distinct score's last occurrence
    ranks = (ends - (counts - 1) / 2.0)[inverse]
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


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def f1_at(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, threshold: float) -> float:
    """F1 of the unsafe class for ``score >= threshold`` (cheap: no AUROC)."""
    s, y = _as_arrays(scores, labels)
    pred = s >= threshold
    tp = np.sum(pred & (y == 1))
    fp = np.sum(pred & (y == 0))
    fn = np.sum(~pred & (y == 1))
    return float(_f1(np.asarray(tp, dtype=np.float64), np.asarray(fp, dtype=np.float64), np.asarray(fn)))


def _candidates(scores: np.ndarray, default: float, bounds: tuple[float, float]) -> np.ndarray:
    """Threshold candidates: ``default`` and the midpoints between distinct scores, clipped to ``bounds``."""
    uniq = np.unique(scores)
    cands = np.concatenate([[default], (uniq[:-1] + uniq[1:]) / 2.0]) if uniq.size > 1 else np.array([default])
    return np.unique(np.clip(cands, *bounds))


def _counts_above(s: np.ndarray, y: np.ndarray, cands: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """True and false positives at each candidate threshold (``score >= t``), and the numbers of positives and
    negatives."""
    pos, neg = np.sort(s[y == 1]), np.sort(s[y == 0])
    tp = (pos.size - np.searchsorted(pos, cands, side="left")).astype(np.float64)
    fp = (neg.size - np.searchsorted(neg, cands, side="left")).astype(np.float64)
    return tp, fp, pos.size, neg.size


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
    set's class mix). Candidates are ``default`` and the midpoints between distinct scores, clipped to
    ``bounds`` so that a handful of validation rows cannot push a threshold to an extreme; ties go to
    the candidate closest to ``default``, then the smaller one. With only one class present (or no
    candidate within ``target_fpr``), returns ``default``. Vectorised: the merge search calls it for
    every policy at every iteration.
    """
    if objective not in ("f1", "balanced"):
        raise ValueError(f"objective must be 'f1' or 'balanced', got {objective!r}")
    s, y = _as_arrays(scores, labels)
    if y.size == 0 or y.min() == y.max():
        return default
    cands = _candidates(s, default, bounds)
    tp, fp, n_pos, n_neg = _counts_above(s, y, cands)
    fn, tn = n_pos - tp, n_neg - fp
    closeness = -np.abs(cands - default)
    if target_fpr is not None:
        fpr = fp / n_neg
        ok = fpr <= target_fpr
        if not ok.any():
            return default
        keys: tuple[np.ndarray, ...] = (tp / n_pos, -fpr, closeness)  # recall, then fewer FPs
    elif objective == "balanced":
        ok = np.ones_like(cands, dtype=bool)
        keys = ((_f1(tp, fp, fn) + _f1(tn, fn, fp)) / 2.0, closeness)
    else:
        ok = np.ones_like(cands, dtype=bool)
        keys = (_f1(tp, fp, fn), closeness)
    # np.lexsort sorts by its last key first; maximise every key (rounded: equal objectives computed along
    # different float paths must tie), then the smaller threshold wins.
    order = np.lexsort((cands, *(-np.round(k, 12) for k in reversed(keys))))
    best = next(int(i) for i in order if ok[i])
    return float(cands[best])


def calibrate_threshold_mean(
    parts: Sequence[tuple[np.ndarray, np.ndarray]], default: float = 0.5, bounds: tuple[float, float] = (0.05, 0.95)
) -> float:
    """The threshold with the best *mean* F1 over several validation sets (each ``(scores, labels)``, each with
    both labels), so that no one distribution's score scale decides alone. Candidates, bounds and ties as in
    ``calibrate_threshold``."""
    parts = [_as_arrays(s, y) for s, y in parts]
    parts = [(s, y) for s, y in parts if y.size and y.min() != y.max()]
    if not parts:
        return default
    cands = _candidates(np.concatenate([s for s, _ in parts]), default, bounds)
    total = np.zeros_like(cands)
    for s, y in parts:
        tp, fp, n_pos, _ = _counts_above(s, y, cands)
        total += _f1(tp, fp, n_pos - tp)
    order = np.lexsort((cands, -np.abs(cands - default), -np.round(total / len(parts), 12)))
    return float(cands[int(order[0])])


def macro(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else 0.0
