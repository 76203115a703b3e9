"""Metric values against hand-computed ones; threshold calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.metrics import auroc, binary_metrics, calibrate_threshold, f1_at, macro

SCORES = [0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1]
LABELS = [1, 1, 0, 1, 0, 1, 0, 0]


def test_binary_metrics_by_hand() -> None:
    # threshold 0.5: predicted unsafe = 0.9, 0.8, 0.7, 0.6 -> TP=3 (0.9, 0.8, 0.6), FP=1 (0.7)
    # FN=1 (0.3), TN=3 (0.4, 0.2, 0.1)
    m = binary_metrics(SCORES, LABELS, 0.5)
    assert m.precision == pytest.approx(3 / 4)
    assert m.recall == pytest.approx(3 / 4)
    assert m.f1 == pytest.approx(0.75)
    assert m.fpr == pytest.approx(1 / 4)
    assert m.support == 8 and m.positives == 4
    # AUROC: positive/negative pairs ranked correctly: 0.9>all 4, 0.8>all 4, 0.6>0.4,0.2,0.1 (3), 0.3>0.2,0.1 (2)
    assert m.auroc == pytest.approx((4 + 4 + 3 + 2) / 16)


def test_threshold_is_inclusive() -> None:
    m = binary_metrics([0.5, 0.49], [1, 0], 0.5)
    assert m.precision == 1.0 and m.recall == 1.0 and m.fpr == 0.0


def test_auroc_ties_and_single_class() -> None:
    # one tie between a positive and a negative counts one half
    assert auroc([0.5, 0.5, 0.9, 0.1], [1, 0, 1, 0]) == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    assert auroc([0.1, 0.2], [1, 1]) is None
    assert auroc([0.2, 0.1], [1, 0]) == 1.0 and auroc([0.1, 0.2], [1, 0]) == 0.0


def test_degenerate_cases() -> None:
    m = binary_metrics([0.1, 0.2], [0, 0], 0.5)
    assert m.precision == 0.0 and m.recall == 0.0 and m.f1 == 0.0 and m.fpr == 0.0 and m.auroc is None
    with pytest.raises(ValueError, match="shape"):
        binary_metrics([0.1], [0, 1])
    with pytest.raises(ValueError, match="0 \\(safe\\) or 1"):
        binary_metrics([0.1, 0.2], [0, 2])


def test_calibrate_best_f1() -> None:
    scores = [0.1, 0.2, 0.3, 0.35, 0.4, 0.8]
    labels = [0, 0, 0, 1, 1, 1]
    t = calibrate_threshold(scores, labels)
    assert 0.3 < t <= 0.35  # the midpoint between 0.3 and 0.35 separates perfectly
    assert binary_metrics(scores, labels, t).f1 == 1.0
    assert calibrate_threshold([0.2, 0.9], [1, 1], default=0.42) == 0.42


def test_calibrate_target_fpr_and_bounds() -> None:
    rng = np.random.default_rng(0)
    neg = rng.uniform(0.0, 0.6, 200)
    pos = rng.uniform(0.4, 1.0, 200)
    scores = np.concatenate([neg, pos])
    labels = np.array([0] * 200 + [1] * 200)
    t = calibrate_threshold(scores, labels, target_fpr=0.05)
    assert binary_metrics(scores, labels, t).fpr <= 0.05
    looser = calibrate_threshold(scores, labels, target_fpr=0.2)
    assert looser <= t
    assert 0.05 <= calibrate_threshold([0.001, 0.002], [0, 1]) <= 0.95
    # separable scores: full recall is reachable anywhere in (0.3, 0.8); the threshold must not sit at the
    # bottom of that range (that would flag every borderline safe prompt for nothing)
    sep = calibrate_threshold([0.1, 0.2, 0.3, 0.8, 0.9], [0, 0, 0, 1, 1], target_fpr=0.5)
    assert binary_metrics([0.1, 0.2, 0.3, 0.8, 0.9], [0, 0, 0, 1, 1], sep).fpr == 0.0 and sep >= 0.5


def test_macro() -> None:
    assert macro([0.5, 1.0]) == 0.75
    assert macro([]) == 0.0
    assert not math.isnan(macro([0.0]))


def test_calibrate_balanced_weighs_false_positives_like_misses() -> None:
    # Unsafe-heavy validation: best unsafe-F1 flags the safe prompt at 0.4; the balanced objective
    # (mean F1 of both classes) keeps it safe.
    scores = [0.35, 0.4, 0.6, 0.7, 0.8, 0.9, 0.1]
    labels = [1, 0, 1, 1, 1, 1, 0]
    f1_t = calibrate_threshold(scores, labels)  # unsafe F1 10/11 at 0.225 (flags the safe 0.4)
    balanced_t = calibrate_threshold(scores, labels, objective="balanced")  # mean F1 (8/9 + 4/5) / 2 at 0.5
    assert abs(f1_t - 0.225) < 1e-9
    assert abs(balanced_t - 0.5) < 1e-9
    assert binary_metrics(scores, labels, balanced_t).fpr == 0.0
    with pytest.raises(ValueError, match="objective"):
        calibrate_threshold(scores, labels, objective="accuracy")


@pytest.mark.parametrize("seed", range(6))
def test_calibration_is_the_best_candidate_by_brute_force(seed: int) -> None:
    """The vectorised calibrator picks what an exhaustive search over the same candidates picks (exact
    fractions: float noise must not break ties), for every objective."""
    from fractions import Fraction

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 50)
    scores = np.round(np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1), 2)  # rounding makes ties
    uniq = np.unique(scores)
    candidates = np.unique(np.clip(np.concatenate([[0.5], (uniq[:-1] + uniq[1:]) / 2]), 0.05, 0.95))

    def counts(t: float) -> tuple[int, int, int, int]:
        pred = scores >= t
        y = labels == 1
        return int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum()), int((~pred & ~y).sum())

    def f1(a: int, b: int, c: int) -> Fraction:
        return Fraction(2 * a, 2 * a + b + c) if 2 * a + b + c else Fraction(0)

    objectives = {
        "f1": lambda tp, fp, fn, tn: (f1(tp, fp, fn),),
        "balanced": lambda tp, fp, fn, tn: ((f1(tp, fp, fn) + f1(tn, fn, fp)) / 2,),
        "fpr": lambda tp, fp, fn, tn: (Fraction(tp, tp + fn), -Fraction(fp, fp + tn)),
    }
    for name, key in objectives.items():
        allowed = [t for t in candidates if name != "fpr" or Fraction(counts(t)[1], int((labels == 0).sum())) <= 0.2]
        best = max(allowed, key=lambda t: (*key(*counts(t)), -Fraction(abs(t - 0.5)), -t))
        kwargs = {"target_fpr": 0.2} if name == "fpr" else {"objective": name}
        assert calibrate_threshold(scores, labels, **kwargs) == pytest.approx(best), name
        assert f1_at(scores, labels, best) == pytest.approx(binary_metrics(scores, labels, best).f1)


def test_mean_f1_calibration_weighs_each_validation_set_equally() -> None:
    """Two validation sets on different score scales: the threshold that maximises the mean of their F1s, not the
    F1 of the larger one; one set alone gives that set's own best-F1 threshold; bounds hold."""
    from training.metrics import calibrate_threshold_mean

    # a large set separated at 0.8 and a small one separated at 0.4
    big = (np.array([0.9] * 40 + [0.7] * 40), np.array([1] * 40 + [0] * 40))
    small = (np.array([0.5] * 5 + [0.3] * 5), np.array([1] * 5 + [0] * 5))
    pooled = calibrate_threshold(np.concatenate([big[0], small[0]]), np.concatenate([big[1], small[1]]))
    assert pooled == pytest.approx(0.8)  # pooling lets the big set decide: the small set's unsafe rows are missed
    mean = calibrate_threshold_mean([big, small])
    assert mean == pytest.approx(0.4)  # at 0.4: big F1 2*40/(80+40) = 0.667, small 1.0 -> mean 0.833 > 0.5 at 0.8
    assert calibrate_threshold_mean([big]) == pytest.approx(calibrate_threshold(*big))
    assert calibrate_threshold_mean([big, small], bounds=(0.6, 0.95)) == pytest.approx(0.8)
    assert calibrate_threshold_mean([(np.array([0.2, 0.3]), np.array([0, 0]))]) == 0.5  # one label only: default
