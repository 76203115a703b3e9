"""The parity gate: an exported model must give the torch checkpoint's verdicts.

Both models score the same validation rows; verdicts use the same thresholds (score >= threshold is
unsafe). The export fails with a ``ParityError`` when verdict agreement or macro-F1 drift past the
target's tolerance. Pure numpy + pydantic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from export.manifest import Target
from training.metrics import binary_metrics, macro


class Tolerance(BaseModel):
    """What a target must meet. ``max_f1_delta`` is in F1 units (0.01 = 1 point), over the policies with at least
    ``f1_min_rows`` gate rows of each label: on a dozen rows one flip moves a policy's F1 by ten points, which is
    noise, not drift (those rows still count in the verdict agreement, and their F1 is reported per policy)."""

    model_config = ConfigDict(extra="forbid")

    min_agreement: float
    max_f1_delta: float
    max_abs_diff: float | None = None
    f1_min_rows: int = 30


TOLERANCES: dict[Target, Tolerance] = {
    "cpu-int8": Tolerance(min_agreement=0.99, max_f1_delta=0.01),
    # fp32 differs from torch only by operator fusion: scores must match closely too.
    "cpu-fp32": Tolerance(min_agreement=0.99, max_f1_delta=0.002, max_abs_diff=1e-3),
    # Measured with ONNX Runtime's CPU fp16 kernels here; the CUDA EP is checked on a GPU (docs/EXPORT.md).
    "cuda-fp16": Tolerance(min_agreement=0.99, max_f1_delta=0.01),
}


class PolicyParity(BaseModel):
    rows: int
    threshold: float
    agreement: float
    f1_torch: float
    f1_onnx: float
    in_f1_delta: bool = True  # enough rows of each label to count in the macro-F1 drift


class Disagreement(BaseModel):
    policy: str
    query: str
    label: int
    torch: float
    onnx: float
    threshold: float


class ParityReport(BaseModel):
    target: Target
    rows: int
    agreement: float
    macro_f1_torch: float
    macro_f1_onnx: float
    f1_delta_points: float
    max_abs_diff: float
    mean_abs_diff: float
    per_policy: dict[str, PolicyParity]
    worst: list[Disagreement]
    tolerance: Tolerance
    passed: bool
    failures: list[str]

    def format(self) -> str:
        lines = [
            f"parity ({self.target}, {self.rows} rows): {'PASSED' if self.passed else 'FAILED'}",
            f"  verdict agreement {self.agreement:.2%} (need >= {self.tolerance.min_agreement:.0%}); "
            f"macro-F1 torch {self.macro_f1_torch:.4f} vs onnx {self.macro_f1_onnx:.4f} over the policies marked * "
            f"(delta {self.f1_delta_points:.2f} points, allowed {self.tolerance.max_f1_delta * 100:.1f}); "
            f"|score diff| max {self.max_abs_diff:.2e} mean {self.mean_abs_diff:.2e}",
        ]
        lines += [f"  FAIL: {f}" for f in self.failures]
        lines.append(f"  {'policy':<24} {'rows':>6} {'thr':>5} {'agree':>8} {'F1 torch':>9} {'F1 onnx':>9}")
        for name, p in sorted(self.per_policy.items()):
            mark = "*" if p.in_f1_delta else " "
            lines.append(
                f"  {name:<23}{mark} {p.rows:>6} {p.threshold:>5.2f} {p.agreement:>8.2%} {p.f1_torch:>9.4f} "
                f"{p.f1_onnx:>9.4f}"
            )
        if self.worst:
            lines.append("  largest score differences (torch -> onnx):")
            for d in self.worst:
                flip = "FLIP" if (d.torch >= d.threshold) != (d.onnx >= d.threshold) else "same"
                lines.append(
                    f"    [{flip}] {d.policy}: {d.torch:.4f} -> {d.onnx:.4f} (thr {d.threshold:.2f}, label {d.label}) "
                    f"{d.query!r}"
                )
        return "\n".join(lines)


class ParityError(RuntimeError):
    """The exported model disagrees with the torch checkpoint beyond the target's tolerance."""

    def __init__(self, report: ParityReport) -> None:
        self.report = report
        super().__init__(report.format())


def compare(
    target: Target,
    policies: Sequence[str],
    queries: Sequence[str],
    labels: Sequence[int],
    torch_scores: Sequence[float],
    onnx_scores: Sequence[float],
    thresholds: dict[str, float],
    worst_n: int = 5,
) -> ParityReport:
    """Compare two models' scores on the same rows (one policy name, query and label per row)."""
    n = len(policies)
    if n == 0:
        raise ValueError("parity needs validation rows (pass --val FILE_OR_DIR)")
    if not (len(queries) == len(labels) == len(torch_scores) == len(onnx_scores) == n):
        raise ValueError("parity: policies, queries, labels and both score lists must have the same length")
    tol = TOLERANCES[target]
    t = np.asarray(torch_scores, dtype=np.float64)
    o = np.asarray(onnx_scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    pol = np.asarray(policies, dtype=object)
    thr = np.asarray([thresholds[p] for p in policies], dtype=np.float64)
    agree = (t >= thr) == (o >= thr)
    diff = np.abs(t - o)

    per_policy: dict[str, PolicyParity] = {}
    for name in sorted(set(policies)):
        mask = pol == name
        threshold = thresholds[name]
        positives = int(y[mask].sum())
        per_policy[name] = PolicyParity(
            rows=int(mask.sum()),
            threshold=threshold,
            agreement=float(agree[mask].mean()),
            f1_torch=binary_metrics(t[mask], y[mask], threshold).f1,
            f1_onnx=binary_metrics(o[mask], y[mask], threshold).f1,
            in_f1_delta=min(positives, int(mask.sum()) - positives) >= tol.f1_min_rows,
        )
    counted = [p for p in per_policy.values() if p.in_f1_delta] or list(per_policy.values())  # none: all count
    f1_torch = macro([p.f1_torch for p in counted])
    f1_onnx = macro([p.f1_onnx for p in counted])
    delta = abs(f1_torch - f1_onnx)
    agreement = float(agree.mean())

    failures: list[str] = []
    if agreement < tol.min_agreement:
        failures.append(f"verdict agreement {agreement:.2%} < {tol.min_agreement:.0%} ({int((~agree).sum())} flips)")
    if delta > tol.max_f1_delta + 1e-12:
        failures.append(f"macro-F1 moved {delta * 100:.2f} points > {tol.max_f1_delta * 100:.1f}")
    if tol.max_abs_diff is not None and float(diff.max()) > tol.max_abs_diff:
        failures.append(f"max |score diff| {float(diff.max()):.2e} > {tol.max_abs_diff:.0e}")

    # Flipped verdicts first, then the largest score differences.
    order = sorted(range(n), key=lambda i: (bool(agree[i]), -float(diff[i])))[:worst_n]
    worst = [
        Disagreement(
            policy=str(pol[i]),
            query=queries[i][:80],
            label=int(y[i]),
            torch=float(t[i]),
            onnx=float(o[i]),
            threshold=float(thr[i]),
        )
        for i in order
    ]
    return ParityReport(
        target=target,
        rows=n,
        agreement=agreement,
        macro_f1_torch=f1_torch,
        macro_f1_onnx=f1_onnx,
        f1_delta_points=delta * 100,
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        per_policy=per_policy,
        worst=worst,
        tolerance=tol,
        passed=not failures,
        failures=failures,
    )


def check(report: ParityReport) -> ParityReport:
    """Raise ``ParityError`` unless the report passed."""
    if not report.passed:
        raise ParityError(report)
    return report
