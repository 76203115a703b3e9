"""Prefix mode on ONNX Runtime: a cache of policy keys/values in one persistent bank, fed with per-row indices.

The exported prefix graph (``export.prefix``) takes query tokens plus a bank of policies' keys/values
(``policy_key_<l>``/``policy_value_<l>`` ``[N, heads, P, head_dim]`` per layer, ``policy_mask`` ``[N, P]``) and
``policy_index`` ``[B]``; the same graph encodes a policy (its segment fed as the query against a masked one-slot
bank; ``present_*`` are its keys/values). ``PolicyBank`` keeps those keys/values in preallocated arrays, one
slot per policy, keyed by the policy segment's hash:

- registry policies are *pinned*: computed at start-up and on hot reload (only new or changed texts), never
  evicted;
- any other policy (inline custom policies) is computed on first use and kept in a bounded LRU.

The arrays are passed whole on every batch (no per-batch stacking); the graph gathers the batch's rows.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from export.manifest import QUERY_INPUTS, KVLayout
from policies.instruction import PolicySegment, Window
from scoring.core import pad_windows, policy_rows, softmax_unsafe

log = logging.getLogger("uniguard.scoring")


class PolicyBank:
    """Slots of policy keys/values: pinned (registry) policies plus an LRU of at most ``lru_size`` others."""

    def __init__(self, layout: KVLayout, lru_size: int = 64, capacity: int = 8) -> None:
        self.layout = layout
        self.lru_size = lru_size
        self.slots: dict[str, int] = {}
        self.pinned: set[str] = set()
        self.lru: OrderedDict[str, None] = OrderedDict()  # unpinned keys, least recently used first
        self.free: list[int] = []
        self.evictions = 0
        self.arrays: list[np.ndarray] = []
        self.mask = np.zeros((0, layout.max_policy_len), dtype=np.int64)
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        old = self.mask.shape[0]
        lay = self.layout
        shape = (capacity, lay.heads, lay.max_policy_len, lay.head_dim)
        arrays = [np.zeros(shape, dtype=np.float32) for _ in range(2 * lay.layers)]
        mask = np.zeros((capacity, lay.max_policy_len), dtype=np.int64)
        for new, current in zip(arrays, self.arrays, strict=False):
            new[:old] = current
        mask[:old] = self.mask
        self.arrays, self.mask = arrays, mask
        self.free.extend(range(capacity - 1, old - 1, -1))

    def __len__(self) -> int:
        return len(self.slots)

    def __contains__(self, key: object) -> bool:
        return key in self.slots

    def slot(self, key: str) -> int:
        """The slot of a cached policy (an unpinned one becomes the most recently used)."""
        if key in self.lru:
            self.lru.move_to_end(key)
        return self.slots[key]

    def store(self, key: str, kv: Sequence[np.ndarray], length: int, pinned: bool) -> int:
        """Put one policy's keys/values (per layer and kind ``[heads, length, head_dim]``) in a slot."""
        if key in self.slots:
            if pinned:
                self.pin(key)
            return self.slot(key)
        if not pinned:
            while len(self.lru) >= self.lru_size and self.lru:
                self.discard(next(iter(self.lru)))
                self.evictions += 1
        if not self.free:
            self._grow(2 * self.mask.shape[0])
        index = self.free.pop()
        for array, value in zip(self.arrays, kv, strict=True):
            array[index] = 0.0
            array[index, :, :length] = value
        self.mask[index] = 0
        self.mask[index, :length] = 1
        self.slots[key] = index
        if pinned:
            self.pinned.add(key)
        else:
            self.lru[key] = None
        return index

    def pin(self, key: str) -> None:
        self.lru.pop(key, None)
        self.pinned.add(key)

    def unpin(self, key: str) -> None:
        """A pinned policy becomes an ordinary LRU entry (it may still serve inline requests)."""
        if key in self.pinned:
            self.pinned.discard(key)
            self.lru[key] = None
            while len(self.lru) > self.lru_size:
                self.discard(next(iter(self.lru)))
                self.evictions += 1

    def discard(self, key: str) -> None:
        index = self.slots.pop(key, None)
        if index is None:
            return
        self.pinned.discard(key)
        self.lru.pop(key, None)
        self.mask[index] = 0
        self.free.append(index)


class OnnxPrefixBackend:
    """The prefix graph with its policy bank: windows (query segment + policy segment) in, P(unsafe) out.

    Thread-safe: the service scores in a worker thread while hot reload and warm-up use others."""

    def __init__(self, session: Any, pad_id: int, layout: KVLayout, lru_size: int = 64) -> None:
        self.session = session
        self.pad_id = pad_id
        self.layout = layout
        self.bank = PolicyBank(layout, lru_size)
        self.lock = threading.RLock()
        self.outputs = layout.output_names()
        self.bank_names = layout.input_names()[len(QUERY_INPUTS) : -2]
        self.computed = 0  # policies encoded so far (tests and metrics)

    # -- policies ---------------------------------------------------------------------------------------------
    def encode(self, segments: Sequence[PolicySegment]) -> list[list[np.ndarray]]:
        """Keys/values of policy segments, per segment a list (per layer and kind) of ``[heads, len, head_dim]``."""
        lay = self.layout
        too_long = [len(s) for s in segments if len(s) > lay.max_policy_len]
        if too_long:
            raise ValueError(f"policy segment of {max(too_long)} tokens; this model's bank holds {lay.max_policy_len}")
        feed = pad_windows(segments, self.pad_id)
        empty = np.zeros((1, lay.heads, 1, lay.head_dim), dtype=np.float32)
        feed.update({name: empty for name in self.bank_names})
        feed["policy_mask"] = np.zeros((1, 1), dtype=np.int64)
        feed["policy_index"] = np.zeros(len(segments), dtype=np.int64)
        present = self.session.run(self.outputs[1:], {k: feed[k] for k in self.layout.input_names()})
        self.computed += len(segments)
        return [[p[i, :, : len(s)] for p in present] for i, s in enumerate(segments)]

    def ensure(self, segments: Sequence[PolicySegment], pinned: bool = False) -> list[int]:
        """The bank slots of these policies, encoding (in one batch) those not cached yet."""
        with self.lock:
            missing = list({s.key: s for s in segments if s.key not in self.bank}.values())
            if missing:
                for segment, kv in zip(missing, self.encode(missing), strict=True):
                    self.bank.store(segment.key, kv, len(segment), pinned)
            if pinned:
                for s in segments:
                    self.bank.pin(s.key)
            return [self.bank.slot(s.key) for s in segments]

    def sync_pinned(self, segments: Iterable[PolicySegment]) -> list[str]:
        """Make exactly these policies the pinned set (the registry): encode new or changed texts only, unpin the
        others. Returns the keys that were encoded."""
        wanted = {s.key: s for s in segments}
        with self.lock:
            new = [s for k, s in wanted.items() if k not in self.bank]
            for key in list(self.bank.pinned - set(wanted)):
                self.bank.unpin(key)
            self.ensure(list(wanted.values()), pinned=True)
        return [s.key for s in new]

    # -- scoring ----------------------------------------------------------------------------------------------
    def infer(self, windows: Sequence[Window]) -> np.ndarray:
        segments, index = policy_rows(windows)
        feed = pad_windows(windows, self.pad_id)
        with self.lock:
            slots = np.asarray(self.ensure(segments), dtype=np.int64)
            feed.update(zip(self.bank_names, self.bank.arrays, strict=True))
            feed["policy_mask"] = self.bank.mask
            feed["policy_index"] = slots[index]
            (logits,) = self.session.run(["logits"], feed)
        return softmax_unsafe(np.asarray(logits))

    def forget(self, key: str) -> None:
        with self.lock:
            self.bank.discard(key)

    @property
    def cached_policies(self) -> int:
        return len(self.bank)
