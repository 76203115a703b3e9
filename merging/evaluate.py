"""The search objective, in memory: macro-F1 over the policies with per-policy calibrated thresholds.

``Objective`` builds the validation pairs' windows once and then scores whatever weights are
currently loaded into one reusable model through the scoring core (``training.predict.torch_scorer``:
the same padding, length batches and window aggregation as every other stage). Thresholds: the F1-best
threshold per policy (``training.metrics.calibrate_threshold``, vectorised: it runs every iteration).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel

from policies.instruction import InstructionEncoder
from training.data import Row
from training.metrics import calibrate_threshold, f1_at, macro
from training.predict import Precision, torch_scorer


class PolicyScore(BaseModel):
    f1: float
    threshold: float
    rows: int


class EvalResult(BaseModel):
    macro_f1: float
    policies: dict[str, PolicyScore]

    def macro_over(self, names: Sequence[str]) -> float:
        return macro([self.policies[n].f1 for n in names if n in self.policies])


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
        precision: Precision = "fp32",
    ) -> None:
        missing = sorted({r.policy for r in rows} - set(policy_texts))
        if missing:
            raise ValueError(f"no instruction text for policies {missing} (not in any candidate's meta)")
        self.scorer = torch_scorer(model, encoder, precision)
        self.batch_size = batch_size
        self.policies = sorted({r.policy for r in rows})
        self.row_policies = np.array([r.policy for r in rows])
        self.labels = np.array([r.y for r in rows], dtype=np.int64)
        self.windows = self.scorer.pair_windows([(policy_texts[r.policy], r.text) for r in rows])
        self.n_windows = sum(len(w) for w in self.windows)
        self.n_tokens = sum(len(w) for ws in self.windows for w in ws)

    def __len__(self) -> int:
        return len(self.labels)

    def scores(self) -> np.ndarray:
        """P(unsafe) per row (max over its windows) under the model's current weights."""
        return np.array([p.score for p in self.scorer.score_windows(self.windows, self.batch_size)])

    def result(self, scores: np.ndarray, thresholds: Mapping[str, float] | None = None) -> EvalResult:
        """Per-policy F1 at the given thresholds, or at thresholds calibrated on these scores."""
        out: dict[str, PolicyScore] = {}
        for policy in self.policies:
            mask = self.row_policies == policy
            s, y = scores[mask], self.labels[mask]
            t = calibrate_threshold(s, y) if thresholds is None else float(thresholds.get(policy, 0.5))
            out[policy] = PolicyScore(f1=f1_at(s, y, t), threshold=t, rows=int(mask.sum()))
        return EvalResult(macro_f1=macro([p.f1 for p in out.values()]), policies=out)

    def evaluate(self, thresholds: Mapping[str, float] | None = None) -> EvalResult:
        return self.result(self.scores(), thresholds)
