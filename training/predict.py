"""The torch backend of the scoring core: a checkpoint (or an in-memory model) scores windows with torch.

Used by training's evaluation, the merge objective, the export parity gate's reference side and
``uniguard eval`` of a checkpoint; padding, batching, softmax and aggregation are ``scoring.core``'s.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from policies.instruction import Window, encoder_from_config
from scoring.core import Scorer, pad_windows, policy_rows, softmax_unsafe
from training.meta import CheckpointMeta

Precision = Literal["fp32", "bf16"]


class TorchBackend:
    """A Hugging Face sequence classifier in eval mode; ``precision="bf16"`` runs under bfloat16 autocast.

    Full-mode windows run the Hugging Face forward; prefix-mode windows (``Window.policy`` set) run the prefix
    forward on the same weights: each distinct policy segment of the batch is encoded once and its keys/values
    serve every row under it."""

    def __init__(self, model: Any, pad_id: int, precision: Precision = "fp32") -> None:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        self.model = model
        self.pad_id = pad_id
        self.precision = precision
        self._adapter: Any = None

    def logits(self, windows: Sequence[Window]) -> Any:
        """The logits of a batch (torch, under the caller's grad mode)."""
        import torch

        inputs = {k: torch.from_numpy(v) for k, v in pad_windows(windows, self.pad_id).items()}
        if windows[0].policy is None:
            return self.model(**inputs).logits
        from training.prefix import batch_logits, prefix_adapter

        if self._adapter is None:
            self._adapter = prefix_adapter(self.model)
        segments, index = policy_rows(windows)
        seg = {k: torch.from_numpy(v) for k, v in pad_windows(segments, self.pad_id).items()}
        return batch_logits(self._adapter, inputs, seg, torch.from_numpy(index))

    def infer(self, windows: Sequence[Window]) -> np.ndarray:
        import torch

        was_training = self.model.training
        self.model.eval()
        try:
            with (
                torch.inference_mode(),
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"),
            ):
                logits = self.logits(windows)
        finally:
            self.model.train(was_training)
        return softmax_unsafe(logits.float().numpy())


def torch_scorer(model: Any, encoder: Any, precision: Precision = "fp32") -> Scorer:
    """A scorer for an in-memory model (kept in eval mode while it scores)."""
    return Scorer(encoder, TorchBackend(model, encoder.pad_id, precision))


def load_checkpoint(folder: Path, threads: int | None = None) -> tuple[Scorer, CheckpointMeta]:
    """A checkpoint folder (Hugging Face weights + tokenizer.json + uniguard_meta.json) as a scorer, with its meta."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForSequenceClassification

    if threads:
        torch.set_num_threads(threads)
    meta = CheckpointMeta.load(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    model.eval()
    tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    return torch_scorer(model, encoder_from_config(tokenizer, meta.encoding)), meta
