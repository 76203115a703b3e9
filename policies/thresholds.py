"""The one threshold rule: which decision threshold a model applies to a policy (service and eval alike).

For a policy file (or an inline policy) and the model that scores it (an exported model's manifest or a
training checkpoint's meta), in order:

1. the model's calibrated threshold for that policy, if the model saw this exact policy text (same name and
   content hash): a calibrated threshold belongs to the text it was calibrated on, not to the name;
2. the threshold written explicitly in the policy's file (or given inline);
3. the model's ``default_threshold`` (the threshold for policies it never saw: zero-shot).

A request's own ``thresholds`` override comes before all three (the service applies it); without a model,
the policy's own threshold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from policies.schema import Policy, PolicyRef


class ModelThresholds(Protocol):
    """What a manifest or a checkpoint meta records about thresholds."""

    @property
    def thresholds(self) -> Mapping[str, float]: ...

    @property
    def default_threshold(self) -> float: ...

    @property
    def policies(self) -> Sequence[PolicyRef]: ...


def calibrated_for(policy: Policy, model: ModelThresholds) -> float | None:
    """Step 1: the model's calibrated threshold, only for the exact text it was calibrated on."""
    known = {ref.name: ref.content_hash for ref in model.policies}
    if known.get(policy.name) != policy.content_hash:
        return None
    return model.thresholds.get(policy.name)


def policy_threshold(policy: Policy, model: ModelThresholds | None, explicit: bool | None = None) -> float:
    """The threshold ``model`` applies to ``policy`` (steps 1-3 above). ``explicit`` says whether the policy's
    threshold was written by its author (default: whether its file set the field)."""
    if model is None:
        return policy.threshold
    calibrated = calibrated_for(policy, model)
    if calibrated is not None:
        return calibrated
    if explicit if explicit is not None else "threshold" in policy.model_fields_set:
        return policy.threshold
    return model.default_threshold
