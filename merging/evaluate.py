"""The search objective, in memory: macro-F1 over the policies with per-policy calibrated thresholds.

``Objective`` tokenizes the validation pairs once (``training.predict.pair_windows``) and then scores
whatever weights are currently loaded into one reusable model (``score_windows``, length-sorted
batches). Thresholds: the F1-best threshold per policy (the same rule as
``training.metrics.calibrate_threshold``, vectorised because it runs every iteration).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel

from policies.instruction import InstructionEncoder
from training.data import Row
from training.metrics import macro
from training.predict import pair_windows, score_windows


class PolicyScore(BaseModel):
    f1: float
    threshold: float
    rows: int


class EvalResult(BaseModel):
    macro_f1: float
    policies: dict[str, PolicyScore]

    def macro_over(self, names: Sequence[str]) -> float:
        return macro([self.policies[n].f1 for n in names if n in self.policies])


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def f1_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    pred = scores >= threshold
    tp = float(np.sum(pred & (labels == 1)))
    fp = float(np.sum(pred & (labels == 0)))
    fn = float(np.sum(~pred & (labels == 1)))
    return float(_f1(np.array(tp), np.array(fp), np.array(fn)))


def best_f1_threshold(
    scores: np.ndarray, labels: np.ndarray, default: float = 0.5, bounds: tuple[float, float] = (0.05, 0.95)
) -> tuple[float, float]:
    """(threshold, F1) with the best F1; candidates are ``default`` and the midpoints between distinct
    scores clipped to ``bounds``; ties go to the threshold closest to ``default``, then the smaller one.
    Equals ``training.metrics.calibrate_threshold`` (tested). With one class only: (default, F1 there).
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if y.size == 0 or y.min() == y.max():
        return default, f1_at(s, y, default)
    uniq = np.unique(s)
    cands = np.concatenate([[default], (uniq[:-1] + uniq[1:]) / 2.0]) if uniq.size > 1 else np.array([default])
    cands = np.unique(np.clip(cands, *bounds))
    pos = np.sort(s[y == 1])
    neg = np.sort(s[y == 0])
    tp = pos.size - np.searchsorted(pos, cands, side="left")
    fp = neg.size - np.searchsorted(neg, cands, side="left")
    fn = pos.size - tp
    f1 = _f1(tp.astype(np.float64), fp.astype(np.float64), fn.astype(np.float64))
    order = np.lexsort((cands, np.abs(cands - default), -f1))
    best = int(order[0])
    return float(cands[best]), float(f1[best])


class Objective:
    """Validation pairs tokenized once; ``evaluate()`` scores the model's current weights.

    ``precision="bf16"`` runs the forward pass under bfloat16 autocast (about 1.6× faster on this
    machine's CPU, P(unsafe) within ~1e-4 of fp32).
    """

    def __init__(
        self,
        model: Any,
        encoder: InstructionEncoder,
        rows: Sequence[Row],
        policy_texts: Mapping[str, str],
        batch_size: int = 64,
        precision: str = "fp32",
    ) -> None:
        missing = sorted({r.policy for r in rows} - set(policy_texts))
        if missing:
            raise ValueError(f"no instruction text for policies {missing} (not in any candidate's meta)")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        self.model = model
        self.batch_size = batch_size
        self.precision = precision
        self.policies = sorted({r.policy for r in rows})
        self.row_policies = np.array([r.policy for r in rows])
        self.labels = np.array([r.y for r in rows], dtype=np.int64)
        self.windows = pair_windows(encoder, [(policy_texts[r.policy], r.text) for r in rows])
        self.n_windows = sum(len(w) for w in self.windows)
        self.n_tokens = sum(len(w) for ws in self.windows for w in ws)

    def __len__(self) -> int:
        return len(self.labels)

    def _run_batch(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            logits = self.model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits
            return torch.softmax(logits.float(), dim=-1)[:, 1].numpy()

    def scores(self) -> np.ndarray:
        """P(unsafe) per row (max over its windows) under the model's current weights."""
        return np.array([p.score for p in score_windows(self.windows, self._run_batch, self.batch_size)])

    def result(self, scores: np.ndarray, thresholds: Mapping[str, float] | None = None) -> EvalResult:
        """Per-policy F1 at the given thresholds, or at thresholds calibrated on these scores."""
        out: dict[str, PolicyScore] = {}
        for policy in self.policies:
            mask = self.row_policies == policy
            s, y = scores[mask], self.labels[mask]
            if thresholds is None:
                t, f1 = best_f1_threshold(s, y)
            else:
                t = float(thresholds.get(policy, 0.5))
                f1 = f1_at(s, y, t)
            out[policy] = PolicyScore(f1=f1, threshold=t, rows=int(mask.sum()))
        return EvalResult(macro_f1=macro([p.f1 for p in out.values()]), policies=out)

    def evaluate(self, thresholds: Mapping[str, float] | None = None) -> EvalResult:
        return self.result(self.scores(), thresholds)
