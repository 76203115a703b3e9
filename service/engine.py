"""The engine the service runs: an exported model folder scored by the shared scoring core.

The implementation is ``scoring.onnx.OnnxEngine`` (also what the export parity gate and ``uniguard
eval`` of an exported model run); the service uses ``pair_windows``, ``infer`` (the batcher's
backend), ``warmup``, ``manifest``, ``model_id`` and ``aggregate``.
"""

from __future__ import annotations

from scoring.core import PairScore, aggregate, softmax_unsafe
from scoring.onnx import EngineError, OnnxEngine

__all__ = ["EngineError", "OnnxEngine", "PairScore", "aggregate", "softmax_unsafe"]
