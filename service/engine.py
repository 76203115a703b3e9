"""The ONNX Runtime engine: manifest-checked model folder, instruction encoding, padded batch inference.

No torch here: the fast ``tokenizers`` library and ``onnxruntime`` only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.manifest import Manifest, ManifestError
from policies.instruction import InstructionEncoder, Window, encoder_from_config

ALLOWED_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class EngineError(RuntimeError):
    """The engine cannot start or run; the message says why and how to fix it."""


@dataclass(frozen=True)
class PairScore:
    """The score of one (policy, text) pair: the max over windows, with the best window's character span."""

    score: float
    char_start: int
    char_end: int
    windows: int = 1
    tokens: int = 0


def softmax_unsafe(logits: np.ndarray) -> np.ndarray:
    """P(unsafe) = softmax(logits)[:, 1], computed stably in float64."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e[:, 1] / e.sum(axis=1))


class OnnxEngine:
    """An exported UniGuard model ready to score (policy text, query) pairs."""

    def __init__(self, model_dir: Path, provider: str = "cpu", threads: int | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.model_dir = Path(model_dir)
        self.manifest = Manifest.load(self.model_dir, verify=True)
        for role in ("model", "tokenizer"):
            if role not in self.manifest.files:
                raise ManifestError(f"{self.model_dir / 'manifest.json'}: no {role!r} file listed; re-export the model")
        unknown = set(self.manifest.input_names) - set(ALLOWED_INPUTS)
        if unknown or "input_ids" not in self.manifest.input_names:
            raise ManifestError(
                f"{self.model_dir / 'manifest.json'}: unsupported input_names {self.manifest.input_names} "
                f"(expected input_ids and a subset of {ALLOWED_INPUTS}); re-export the model"
            )
        tokenizer = Tokenizer.from_file(str(self.model_dir / self.manifest.files["tokenizer"].path))
        self.encoder: InstructionEncoder = encoder_from_config(tokenizer, self.manifest.encoding)
        pad = tokenizer.token_to_id("[PAD]")
        self.pad_id = int(pad) if pad is not None else 0

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
        model_path = self.model_dir / self.manifest.files["model"].path
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises several exception types
            raise EngineError(f"{model_path}: ONNX Runtime cannot load the model: {exc}") from exc
        if provider == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise EngineError(
                "UNIGUARD_PROVIDER=cuda but ONNX Runtime fell back to CPU "
                f"(available: {ort.get_available_providers()}); install onnxruntime-gpu with a working CUDA, "
                "or set UNIGUARD_PROVIDER=cpu"
            )
        self.provider = provider
        session_inputs = {i.name for i in self.session.get_inputs()}
        missing = set(self.manifest.input_names) - session_inputs
        if missing:
            raise ManifestError(f"{model_path}: model lacks inputs {sorted(missing)} named in the manifest")
        self.input_names = [n for n in ALLOWED_INPUTS if n in session_inputs]
        self.output_name = self.manifest.output_name

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    # -- encoding -------------------------------------------------------------------------------------------------
    def pair_windows(self, pairs: Sequence[tuple[str, str]]) -> list[list[Window]]:
        """The model inputs of every (policy text, query) pair; each distinct query is tokenized once."""
        texts = list(dict.fromkeys(q for _, q in pairs))
        encodings = dict(zip(texts, self.encoder.tokenize_queries(texts), strict=True))
        return [self.encoder.windows(self.encoder.policy_ids(p), encodings[q], q) for p, q in pairs]

    # -- inference ------------------------------------------------------------------------------------------------
    def infer(self, windows: Sequence[Window]) -> np.ndarray:
        """P(unsafe) for one batch of windows, padded to the longest."""
        if not windows:
            return np.zeros((0,), dtype=np.float64)
        width = max(len(w) for w in windows)
        n = len(windows)
        ids = np.full((n, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        types = np.zeros((n, width), dtype=np.int64)
        for i, w in enumerate(windows):
            k = len(w)
            ids[i, :k] = w.input_ids
            mask[i, :k] = 1
            types[i, :k] = w.token_type_ids
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        (logits,) = self.session.run([self.output_name], {name: feed[name] for name in self.input_names})
        return softmax_unsafe(np.asarray(logits))

    def score_pairs(self, pairs: list[tuple[str, str]], batch_size: int = 32) -> list[PairScore]:
        """Score (policy instruction text, query text) pairs; long queries are windowed, score = max over windows."""
        per_pair = self.pair_windows(pairs)
        flat = [(i, w) for i, ws in enumerate(per_pair) for w in ws]
        order = sorted(range(len(flat)), key=lambda k: len(flat[k][1]))
        scores = np.zeros(len(flat), dtype=np.float64)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            scores[chunk] = self.infer([flat[k][1] for k in chunk])
        return aggregate(per_pair, scores.tolist())

    def warmup(self, batches: int = 3) -> None:
        """Run a few dummy batches of several shapes so the first requests are not slow."""
        lengths = [16, self.max_length // 2, self.max_length]
        sizes = [1, 8, 32]
        for i in range(batches):
            length, size = lengths[i % len(lengths)], sizes[i % len(sizes)]
            ids = [self.pad_id + 1] * length
            window = Window(input_ids=ids, token_type_ids=[0] * length, char_start=0, char_end=0)
            self.infer([window] * size)


def aggregate(per_pair: Sequence[Sequence[Window]], flat_scores: Sequence[float]) -> list[PairScore]:
    """Max over each pair's windows (scores in the same order as the flattened windows)."""
    out: list[PairScore] = []
    k = 0
    for windows in per_pair:
        best, best_j = -1.0, 0
        for j in range(len(windows)):
            if flat_scores[k + j] > best:
                best, best_j = flat_scores[k + j], j
        w = windows[best_j]
        out.append(
            PairScore(
                score=float(best),
                char_start=w.char_start,
                char_end=w.char_end,
                windows=len(windows),
                tokens=sum(len(x) for x in windows),
            )
        )
        k += len(windows)
    return out
