"""Which parameters a merge touches; every other parameter is copied from the anchor model.

Names are those of a Hugging Face ``BertForSequenceClassification`` state dict
(``bert.encoder.layer.3.attention.self.query.weight``, ``classifier.weight``, ...).

- ``all``: every parameter.
- ``attention``: the self-attention projections: ``attention.self.{query,key,value}.{weight,bias}``.
- ``attention_output``: the attention output projection ``attention.output.dense.{weight,bias}``
  (not its LayerNorm).
- ``no_head``: everything but the sequence-classification head, which is the classifier
  (``classifier.*``) *and* the pooler (``bert.pooler.*``): in ``BertForSequenceClassification`` the
  pooler's output feeds only the classifier, so together they map the [CLS] state to the logits,
  and the anchor's head stays consistent with itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

HEAD_PREFIXES = ("classifier.", "bert.pooler.", "pooler.")
_ATTENTION = re.compile(r"(^|\.)attention\.self\.(query|key|value)\.(weight|bias)$")
_ATTENTION_OUTPUT = re.compile(r"(^|\.)attention\.output\.dense\.(weight|bias)$")


def _is_head(name: str) -> bool:
    return name.startswith(HEAD_PREFIXES)


SUBSETS: dict[str, Callable[[str], bool]] = {
    "all": lambda name: True,
    "attention": lambda name: bool(_ATTENTION.search(name)),
    "attention_output": lambda name: bool(_ATTENTION_OUTPUT.search(name)),
    "no_head": lambda name: not _is_head(name),
}


def select(subset: str, names: Iterable[str]) -> list[str]:
    """The parameter names of ``subset`` among ``names`` (in their order); refuses an empty selection."""
    if subset not in SUBSETS:
        raise ValueError(f"unknown parameter subset {subset!r}; choose one of {', '.join(SUBSETS)}")
    names = list(names)
    chosen = [n for n in names if SUBSETS[subset](n)]
    if not chosen:
        raise ValueError(f"parameter subset {subset!r} matches none of the model's {len(names)} parameters")
    return chosen
