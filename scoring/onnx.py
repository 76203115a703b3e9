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
from policies.instruction import PolicySegment, Window, encoder_from_config
from scoring.core import Scorer, pad_windows, softmax_unsafe
from scoring.prefix import OnnxPrefixBackend

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
    """An exported UniGuard model folder (manifest checked) ready to score (policy text, query) pairs.

    Full mode: the sequence-classifier graph. Prefix mode: the prefix graph with a policy keys/values cache
    (``scoring.prefix``): ``sync_policies`` pins the registry's policies (start-up and hot reload), other policies
    are cached on first use in an LRU of ``policy_cache_size``."""

    def __init__(
        self, model_dir: Path, provider: str = "cpu", threads: int | None = None, policy_cache_size: int = 64
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from tokenizers import Tokenizer

        self.model_dir = Path(model_dir)
        self.manifest = Manifest.load(self.model_dir, verify=True)
        manifest_path = self.model_dir / "manifest.json"
        for role in ("model", "tokenizer"):
            if role not in self.manifest.files:
                raise ManifestError(f"{manifest_path}: no {role!r} file listed; re-export the model")
        self.mode = self.manifest.encoding.mode
        layout = self.manifest.kv_layout
        if self.mode == "prefix":
            if layout is None or self.manifest.input_names != layout.input_names():
                raise ManifestError(
                    f"{manifest_path}: a prefix-mode model needs kv_layout and its input names; re-export the model"
                )
        else:
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
        backend: OnnxBackend | OnnxPrefixBackend
        if layout is not None and self.mode == "prefix":
            if encoder.max_segment_len > layout.max_policy_len:
                raise ManifestError(f"{manifest_path}: kv_layout.max_policy_len is shorter than the policy segments")
            backend = OnnxPrefixBackend(session, encoder.pad_id, layout, policy_cache_size)
        else:
            backend = OnnxBackend(session, encoder.pad_id, self.manifest.output_name)
        self.prefix: OnnxPrefixBackend | None = backend if isinstance(backend, OnnxPrefixBackend) else None
        super().__init__(encoder, backend)

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    # -- prefix mode: the policy cache --------------------------------------------------------------------------
    def sync_policies(self, instruction_texts: list[str]) -> list[str]:
        """Prefix mode: pin exactly these policies' keys/values (the registry's), computing new or changed texts
        only; returns the keys computed. A no-op in full mode."""
        if self.prefix is None:
            return []
        return self.prefix.sync_pinned([self.encoder.policy_segment(t) for t in instruction_texts])

    @property
    def cached_policies(self) -> int:
        return self.prefix.cached_policies if self.prefix is not None else 0

    @property
    def pinned_policies(self) -> int:
        return len(self.prefix.bank.pinned) if self.prefix is not None else 0

    @property
    def bytes_per_cached_policy(self) -> int:
        layout = self.manifest.kv_layout
        return layout.bytes_per_policy if layout is not None and self.prefix is not None else 0

    def warmup(self, batches: int = 3) -> None:
        """Run a few dummy batches of several shapes so the first requests are not slow (a dummy policy in prefix
        mode, dropped from the cache afterwards)."""
        pad = self.encoder.pad_id + 1
        segment = None
        if self.prefix is not None:
            n = self.encoder.max_segment_len
            segment = PolicySegment(input_ids=(pad,) * n, token_type_ids=(0,) * n, key="warmup")
        room = self.max_length - (len(segment) if segment is not None else 0)
        lengths = [min(16, room), max(1, room // 2), room]
        sizes = [1, 8, 32]
        for i in range(batches):
            length, size = lengths[i % len(lengths)], sizes[i % len(sizes)]
            window = Window([pad] * length, [0] * length, 0, 0, policy=segment)
            self.infer([window] * size)
        if self.prefix is not None:
            self.prefix.forget("warmup")
