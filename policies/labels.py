"""The label convention, defined once.

Class index 0 is ``safe`` and class index 1 is ``unsafe``; the unsafe class is the positive
class for every metric, and a policy's score is the probability of class 1.
"""

from typing import Final, Literal

Label = Literal["safe", "unsafe"]
SAFE: Final[Label] = "safe"
UNSAFE: Final[Label] = "unsafe"
LABELS: Final[tuple[Label, Label]] = (SAFE, UNSAFE)
ID2LABEL: Final[dict[int, str]] = {0: SAFE, 1: UNSAFE}
LABEL2ID: Final[dict[str, int]] = {SAFE: 0, UNSAFE: 1}


def label_to_id(label: str) -> int:
    """Map ``safe``/``unsafe`` to 0/1; anything else is an error."""
    try:
        return LABEL2ID[label]
    except KeyError:
        raise ValueError(f"label must be 'safe' or 'unsafe', got {label!r}") from None


def verdict(score: float, threshold: float) -> Label:
    """A score at or above the threshold is unsafe."""
    return UNSAFE if score >= threshold else SAFE
