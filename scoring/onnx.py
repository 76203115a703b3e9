"""The ONNX Runtime backend and an exported model folder ready to score: what the service, the export
parity gate and ``uniguard eval`` of an exported model all run.

No torch here: ``onnxruntime``, ``tokenizers`` and numpy only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from export.manifest import Manifest, ManifestError
from policies.instruction import Window, encoder_from_config
from scoring.core import Scorer, pad_windows, softmax_unsafe

log = logging.getLogger("uniguard.scoring")

ALLOWED_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class EngineError(RuntimeError):
    """The engine cannot start or run; the message says why and how to fix it."""


def make_session(path: Path, provider: str = "cpu", threads: int | None = None) -> Any:
    """An ONNX Runtime session with the service's options; ``provider`` is ``cpu`` or ``cuda`` (no silent fallback)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle ORT threads would spin-wait and steal the cores the event loop and the tokenizer need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if provider == "cuda":
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    elif provider == "cpu":
        providers = ["CPUExecutionProvider"]
    else:
        raise EngineError(f"unknown provider {provider!r} (UNIGUARD_PROVIDER must be cpu or cuda)")
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises several exception types
        raise EngineError(f"{path}: ONNX Runtime cannot load the model: {exc}") from exc
    if provider == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise EngineError(
            "UNIGUARD_PROVIDER=cuda but ONNX Runtime fell back to CPU "
            f"(available: {ort.get_available_providers()}); install onnxruntime-gpu with a working CUDA, "
            "or set UNIGUARD_PROVIDER=cpu"
        )
    return session


class OnnxBackend:
    """A full-attention sequence classifier graph: padded windows in, P(unsafe) out."""

    def __init__(self, session: Any, pad_id: int, output_name: str = "logits") -> None:
        self.session = session
        self.pad_id = pad_id
        self.output_name = output_name
        names = {i.name for i in session.get_inputs()}
        self.input_names = [n for n in ALLOWED_INPUTS if n in names]

    def infer(self, windows: Sequence[Window]) -> np.ndarray:
        feed = pad_windows(windows, self.pad_id)
        (logits,) = self.session.run([self.output_name], {name: feed[name] for name in self.input_names})
        return softmax_unsafe(np.asarray(logits))


class OnnxEngine(Scorer):
    """An exported UniGuard model folder (manifest checked) ready to score (policy text, query) pairs."""

    def __init__(self, model_dir: Path, provider: str = "cpu", threads: int | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from tokenizers import Tokenizer

        self.model_dir = Path(model_dir)
        self.manifest = Manifest.load(self.model_dir, verify=True)
        manifest_path = self.model_dir / "manifest.json"
        for role in ("model", "tokenizer"):
            if role not in self.manifest.files:
                raise ManifestError(f"{manifest_path}: no {role!r} file listed; re-export the model")
        unknown = set(self.manifest.input_names) - set(ALLOWED_INPUTS)
        if unknown or "input_ids" not in self.manifest.input_names:
            raise ManifestError(
                f"{manifest_path}: unsupported input_names {self.manifest.input_names} "
                f"(expected input_ids and a subset of {ALLOWED_INPUTS}); re-export the model"
            )
        tokenizer = Tokenizer.from_file(str(self.model_dir / self.manifest.files["tokenizer"].path))
        encoder = encoder_from_config(tokenizer, self.manifest.encoding)
        model_path = self.model_dir / self.manifest.files["model"].path
        session = make_session(model_path, provider, threads)
        missing = set(self.manifest.input_names) - {i.name for i in session.get_inputs()}
        if missing:
            raise ManifestError(f"{model_path}: model lacks inputs {sorted(missing)} named in the manifest")
        self.provider = provider
        self.session = session
        super().__init__(encoder, OnnxBackend(session, encoder.pad_id, self.manifest.output_name))

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    def warmup(self, batches: int = 3) -> None:
        """Run a few dummy batches of several shapes so the first requests are not slow."""
        lengths = [16, self.max_length // 2, self.max_length]
        sizes = [1, 8, 32]
        for i in range(batches):
            length, size = lengths[i % len(lengths)], sizes[i % len(sizes)]
            ids = [self.encoder.pad_id + 1] * length
            window = Window(input_ids=ids, token_type_ids=[0] * length, char_start=0, char_end=0)
            self.infer([window] * size)
