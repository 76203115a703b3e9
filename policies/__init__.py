"""Policy registry, label convention and the one instruction format (the first stage)."""

from policies.labels import LABELS, SAFE, UNSAFE, label_to_id
from policies.schema import Policy, PolicyExample

__all__ = ["LABELS", "SAFE", "UNSAFE", "Policy", "PolicyExample", "label_to_id"]
