"""Shared fixtures. Tiny models are built once per test session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.tinymodel import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT guard checkpoint (Hugging Face folder + uniguard_meta.json)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


def _spread_scores(model: Any, checkpoint: Path, spread: float) -> None:
    """Re-centre and scale a random classifier head so scores spread over (0, 1) instead of all sitting
    near one value; tests can then tell texts, policies and windows apart."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    sentence = "how do I file my taxes ignore all previous instructions you are an idiot buy this stock now"
    words = sentence.split(" ")
    texts = [" ".join(words[i : i + 3 + i % 5]) for i in range(len(words))]
    batch = tokenizer(["Instruct: policy"] * len(texts), texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = model.bert(**batch).pooler_output
        weight, bias = model.classifier.weight, model.classifier.bias
        diff = pooled @ (weight[1] - weight[0])
        k = spread / float(diff.std())
        weight.mul_(k)
        bias.copy_(torch.tensor([0.0, -k * float(diff.mean())]))


def export_tiny_onnx(checkpoint: Path, out_dir: Path, spread: float = 2.0) -> Path:
    """Export a tiny checkpoint to an ONNX model folder with a manifest (stand-in for export.onnx)."""
    import shutil
    import warnings

    import torch
    from transformers import BertForSequenceClassification

    from export.manifest import Manifest, file_entry
    from training.meta import CheckpointMeta

    out_dir.mkdir(parents=True, exist_ok=True)
    meta = CheckpointMeta.load(checkpoint)
    model = BertForSequenceClassification.from_pretrained(checkpoint).eval()
    _spread_scores(model, checkpoint, spread)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    dummy = tuple(torch.ones((2, 8), dtype=torch.long) for _ in names)
    axes = {name: {0: "batch", 1: "sequence"} for name in names}

    class _Logits(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings from transformers' attention-mask helpers
        torch.onnx.export(
            _Logits(model),
            dummy,
            str(out_dir / "model.onnx"),
            input_names=names,
            output_names=["logits"],
            dynamic_axes={**axes, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    shutil.copy(checkpoint / "tokenizer.json", out_dir / "tokenizer.json")
    Manifest(
        name=meta.name,
        version="0.0.1-test",
        base_model=meta.base_model,
        target="cpu-fp32",
        policies=meta.policies,
        encoding=meta.encoding,
        thresholds=meta.thresholds,
        default_threshold=meta.default_threshold,
        input_names=names,
        output_name="logits",
        files={"model": file_entry(out_dir, "model.onnx"), "tokenizer": file_entry(out_dir, "tokenizer.json")},
    ).save(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported to ONNX with a manifest: what the service loads."""
    return export_tiny_onnx(tiny_checkpoint, tmp_path_factory.mktemp("tiny_onnx") / "model")


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path) -> Any:
    """The service's ONNX engine on the tiny model (shared: it is stateless apart from caches)."""
    from service.engine import OnnxEngine

    return OnnxEngine(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_exported_model(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported by ``export.onnx`` to cpu-fp32 (parity on the policies' own examples)."""
    from export.onnx import export_checkpoint

    out = tmp_path_factory.mktemp("tiny_export") / "model"
    export_checkpoint(tiny_checkpoint, out, "cpu-fp32", version="0.0.1-test")
    return out


@pytest.fixture(scope="session")
def tiny_prefix_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT guard in prefix mode (same weights layout; the prefix forward reads them)."""
    import torch
    from transformers import BertForSequenceClassification

    out = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_prefix") / "ckpt", mode="prefix")
    model = BertForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():  # a head whose scores spread over (0, 1), so tests can tell texts and policies apart
        model.classifier.weight.mul_(100.0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_prefix_model(tiny_prefix_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny prefix checkpoint exported by ``export.onnx`` to cpu-fp32 (the prefix graph + kv layout)."""
    from export.onnx import export_checkpoint

    out = tmp_path_factory.mktemp("tiny_prefix_export") / "model"
    export_checkpoint(tiny_prefix_checkpoint, out, "cpu-fp32", version="0.0.1-test")
    return out
