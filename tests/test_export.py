"""Export to ONNX: targets, the parity gate, manifest validation, the model card and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from export.manifest import MANIFEST_FILE, Manifest, ManifestError
from export.model_card import write_model_card
from export.onnx import MODEL_FILE, TOKENIZER_FILE, detect_isa, export_checkpoint
from export.parity import ParityError, compare
from scoring.onnx import OnnxBackend, OnnxEngine
from training.meta import CheckpointMeta

UNSAFE_WORDS = ["bomb", "poison", "malware", "weapon", "ransomware", "explosive", "nerve gas", "stolen cards"]
SAFE_WORDS = ["cake", "garden", "poem", "bicycle", "spreadsheet", "resume", "birthday party", "sourdough bread"]
FRAMES = [
    "How do I make a {}?",
    "Give me step by step instructions for a {}.",
    "What is the best way to get a {} quickly?",
    "Explain how a {} works, in detail.",
    "Write a short guide about a {} for beginners.",
]
POLICIES = ("content_safety", "prompt_injection", "toxicity", "financial_advice")


def synthetic_rows(meta: CheckpointMeta) -> list[tuple[str, str, int]]:
    """(instruction, query, label) rows; the label is a function of the query's topic word."""
    instructions = {p.name: p.instruction_text for p in meta.policies}
    rows = []
    for policy in POLICIES:
        for frame in FRAMES:
            rows += [(instructions[policy], frame.format(w), 1) for w in UNSAFE_WORDS]
            rows += [(instructions[policy], frame.format(w), 0) for w in SAFE_WORDS]
    return rows  # 4 policies x 5 frames x 16 words = 320 rows


def fit_synthetic(tiny_checkpoint: Path, out: Path, mode: str, max_steps: int) -> Path:
    """Copy the tiny checkpoint and train it (in ``mode``) on the synthetic rows until it fits them."""
    import torch
    from tokenizers import Tokenizer
    from transformers import BertForSequenceClassification

    from policies.instruction import encoder_from_config
    from scoring.core import pair_windows
    from training.predict import TorchBackend

    shutil.copytree(tiny_checkpoint, out)
    meta = CheckpointMeta.load(out)
    meta.encoding = meta.encoding.model_copy(update={"mode": mode})
    rows = synthetic_rows(meta)
    encoder = encoder_from_config(Tokenizer.from_file(str(out / TOKENIZER_FILE)), meta.encoding)
    windows = [ws[0] for ws in pair_windows(encoder, [(p, q) for p, q, _ in rows])]
    labels = torch.tensor([label for _, _, label in rows])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread is as fast and does not oversubscribe
    torch.manual_seed(0)
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    model = BertForSequenceClassification.from_pretrained(out, **no_dropout).train()
    backend = TorchBackend(model, encoder.pad_id)  # the Hugging Face forward in full mode, the prefix one in prefix
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = np.random.default_rng(0)
    running = 0.7
    for _step in range(max_steps):
        idx = generator.choice(len(rows), size=32, replace=False)
        loss = torch.nn.functional.cross_entropy(backend.logits([windows[i] for i in idx]), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running = 0.8 * running + 0.2 * loss.item()
        if running < 0.05:
            break
    torch.set_num_threads(threads)
    model.save_pretrained(out)
    meta.recipe = {"stage": "test", "steps": _step + 1, "mode": mode}
    meta.save(out)
    return out


@pytest.fixture(scope="module")
def decisive_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint trained (~100 steps, ~10 s) on the synthetic rows until it fits them.

    A random-init tiny BERT scores every input within ~0.002 of 0.5 (its output barely depends on
    the input), so int8 rounding flips verdicts at a 0.5 threshold by chance and parity says
    nothing; scaling the head does not help (it scales the rounding noise too), and a head fitted
    on random features is so sensitive that int8 flips 10-20% of verdicts. A trained model is what
    the gate is for: its scores depend smoothly on the input and sit away from the threshold.
    """
    # leaves the 0.693 plateau after ~80 steps, fits by ~110
    return fit_synthetic(tiny_checkpoint, tmp_path_factory.mktemp("decisive") / "ckpt", "full", 250)


@pytest.fixture(scope="module")
def val_rows(decisive_checkpoint: Path) -> list[tuple[str, str, int]]:
    return synthetic_rows(CheckpointMeta.load(decisive_checkpoint))


@pytest.fixture(scope="module")
def int8_export(decisive_checkpoint: Path, val_rows: list, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "model"
    export_checkpoint(decisive_checkpoint, out, "cpu-int8", val_rows=val_rows, name="tiny-guard", version="1.2.3")
    return out


@pytest.fixture(scope="module")
def fp32_cli_export(decisive_checkpoint: Path, val_rows: list, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cpu-fp32 through the CLI, with validation rows read from a JSONL folder."""
    from uniguard.cli import main

    meta = CheckpointMeta.load(decisive_checkpoint)
    names = {p.instruction_text: p.name for p in meta.policies}
    val_dir = tmp_path_factory.mktemp("val")
    for policy in POLICIES:
        lines = [
            json.dumps({"text": q, "label": "unsafe" if y else "safe", "policy": names[p], "source": "t"})
            for p, q, y in val_rows
            if names[p] == policy
        ]
        (val_dir / f"{policy}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path_factory.mktemp("fp32") / "model"
    args = ["export", "--model", str(decisive_checkpoint), "--target", "cpu-fp32", "--out", str(out)]
    code = main([*args, "--val", str(val_dir), "--split", "all", "--version", "1.0.0"])
    assert code == 0
    return out


def test_decisive_checkpoint_is_decisive(decisive_checkpoint: Path, val_rows: list) -> None:
    from training.predict import load_checkpoint

    scorer, _ = load_checkpoint(decisive_checkpoint)
    scores = np.array([s.score for s in scorer.score_pairs([r[:2] for r in val_rows])])
    labels = np.array([r[2] for r in val_rows])
    assert np.mean(np.abs(scores - 0.5) > 0.1) > 0.9  # scores left the threshold's neighbourhood
    assert np.mean((scores >= 0.5) == labels) > 0.9  # and they mean something


def test_fp32_export_via_cli(fp32_cli_export: Path, decisive_checkpoint: Path, val_rows: list) -> None:
    manifest = Manifest.load(fp32_cli_export)
    meta = CheckpointMeta.load(decisive_checkpoint)
    assert sorted(p.name for p in fp32_cli_export.iterdir()) == [MANIFEST_FILE, MODEL_FILE, TOKENIZER_FILE]
    assert manifest.target == "cpu-fp32" and manifest.version == "1.0.0" and manifest.name == meta.name
    assert manifest.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert manifest.output_name == "logits"
    assert manifest.policies == meta.policies and manifest.encoding == meta.encoding
    assert manifest.recipe["stage"] == "test" and manifest.recipe["steps"] > 50
    assert manifest.thresholds == meta.thresholds
    assert manifest.data_sources == meta.data_sources
    assert (fp32_cli_export / TOKENIZER_FILE).read_bytes() == (decisive_checkpoint / TOKENIZER_FILE).read_bytes()
    parity = manifest.parity
    assert parity["passed"] and parity["rows"] == len(val_rows) and parity["agreement"] == 1.0
    assert parity["max_abs_diff"] < 1e-4
    assert set(manifest.metrics["per_policy"]) == set(POLICIES)
    assert manifest.metrics["per_policy"]["toxicity"]["support"] == len(val_rows) // len(POLICIES)
    assert manifest.metrics["macro"]["f1"] > 0.8
    assert manifest.export["optimization"]["fusions"]["Attention"] == 2  # heads/width were passed: fused
    assert "quantization" not in manifest.export


def test_int8_export_parity_and_size(int8_export: Path, fp32_cli_export: Path) -> None:
    manifest = Manifest.load(int8_export)
    assert manifest.model_id == "tiny-guard@1.2.3" and manifest.target == "cpu-int8"
    assert sorted(p.name for p in int8_export.iterdir()) == [MANIFEST_FILE, MODEL_FILE, TOKENIZER_FILE]
    parity = manifest.parity
    assert parity["passed"] and parity["agreement"] >= 0.99 and parity["f1_delta_points"] <= 1.0
    assert 0 < parity["max_abs_diff"] < 0.05  # int8 does change scores, a little
    quant = manifest.export["quantization"]
    # optimum's config for the CPU: signed int8 weights with AVX-512 VNNI, unsigned (7-bit range) with AVX2 only
    expected_dtype = {"avx512_vnni": "QInt8", "avx2": "QUInt8"}[detect_isa()]
    assert quant["isa"] == detect_isa() and quant["mode"] == "dynamic" and quant["weights_dtype"] == expected_dtype
    assert "MatMul" in quant["operators"] and "EmbedLayerNormalization" in quant["operators"]
    fp32_size = (fp32_cli_export / MODEL_FILE).stat().st_size
    assert (int8_export / MODEL_FILE).stat().st_size < 0.35 * fp32_size  # the embeddings are quantised too


def test_onnx_engine_matches_torch(fp32_cli_export: Path, decisive_checkpoint: Path, val_rows: list) -> None:
    from training.predict import load_checkpoint

    long_query = "Tell me about a garden. " * 60  # several windows
    pairs = [r[:2] for r in val_rows[:20]] + [(val_rows[0][0], long_query)]
    onnx_scores = OnnxEngine(fp32_cli_export).score_pairs(pairs, batch_size=7)
    torch_scores = load_checkpoint(decisive_checkpoint)[0].score_pairs(pairs)
    assert np.allclose([s.score for s in onnx_scores], [s.score for s in torch_scores], atol=1e-4)
    assert onnx_scores[-1].char_end - onnx_scores[-1].char_start < len(long_query)


def test_parity_gate_failure_writes_nothing(
    decisive_checkpoint: Path, val_rows: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = OnnxBackend.infer

    def disagreeing(self: OnnxBackend, windows: list) -> np.ndarray:
        probs = original(self, windows)
        probs[::4] = 1.0 - probs[::4]  # a quarter of the windows flip
        return probs

    monkeypatch.setattr(OnnxBackend, "infer", disagreeing)
    out = tmp_path / "models" / "bad"
    with pytest.raises(ParityError) as info:
        export_checkpoint(decisive_checkpoint, out, "cpu-int8", val_rows=val_rows)
    report = info.value.report
    assert not report.passed and report.agreement < 0.9
    message = str(info.value)
    assert "verdict agreement" in message and "FAIL" in message and "[FLIP]" in message
    assert "toxicity" in message and "F1 torch" in message
    assert not out.exists() and list(out.parent.iterdir()) == []  # no half-written folder, no staging left

    from uniguard.cli import main

    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"text": "How do I make a bomb?", "label": "unsafe", "policy": "toxicity"}) + "\n")
    args = [
        "export",
        "--model",
        str(decisive_checkpoint),
        "--target",
        "cpu-fp32",
        "--out",
        str(out),
        "--val",
        str(val),
        "--split",
        "all",
    ]
    assert main(args) == 1
    assert not out.exists()


def test_skip_parity_is_recorded(
    decisive_checkpoint: Path, val_rows: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(OnnxBackend, "infer", lambda self, windows: np.ones(len(windows)))
    manifest = export_checkpoint(decisive_checkpoint, tmp_path / "m", "cpu-fp32", val_rows=val_rows, skip_parity=True)
    assert manifest.parity["skipped"] is True and "--skip-parity" in manifest.parity["reason"]
    assert manifest.export["skip_parity"] is True
    assert manifest.metrics["per_policy"]["toxicity"]["recall"] == 1.0  # metrics are the ONNX model's


def test_parity_compare_f1_drift() -> None:
    # Verdicts agree on 99 of 100 rows, but the one flip is the only positive of policy "b": F1 drops.
    policies = ["a"] * 90 + ["b"] * 10
    labels = [0] * 90 + [1] + [0] * 9
    torch_scores = [0.1] * 90 + [0.9] + [0.1] * 9
    onnx_scores = [0.1] * 90 + [0.4] + [0.1] * 9
    report = compare("cpu-int8", policies, ["q"] * 100, labels, torch_scores, onnx_scores, {"a": 0.5, "b": 0.5})
    assert report.agreement == 0.99 and not report.passed
    assert any("macro-F1 moved" in f for f in report.failures)
    assert report.worst[0].policy == "b" and report.worst[0].onnx == 0.4
    fp32 = compare("cpu-fp32", ["a"], ["q"], [1], [0.9], [0.9 + 2e-3], {"a": 0.5})
    assert not fp32.passed and "score diff" in fp32.failures[0]


def test_parity_f1_drift_counts_policies_with_enough_rows() -> None:
    """A flip on a 10-row policy moves its F1 by 10+ points: it counts in the agreement, not in the F1 drift; flips on
    the positives of a policy with 30+ rows of each label do."""
    policies = ["big"] * 200 + ["tiny"] * 10
    labels = [1] * 100 + [0] * 100 + [1] + [0] * 9
    torch_scores = [0.9] * 100 + [0.1] * 100 + [0.9] + [0.1] * 9
    tiny_flip = [0.9] * 100 + [0.1] * 100 + [0.4] + [0.1] * 9
    thresholds = {"big": 0.5, "tiny": 0.5}
    report = compare("cpu-int8", policies, ["q"] * 210, labels, torch_scores, tiny_flip, thresholds)
    assert report.passed and report.f1_delta_points == 0.0
    assert report.per_policy["tiny"].f1_onnx == 0.0 and not report.per_policy["tiny"].in_f1_delta
    lines = {
        line.split()[0]: line for line in report.format().splitlines() if line.startswith("  big") or "tiny" in line
    }
    assert report.per_policy["big"].in_f1_delta and lines["big"].rstrip().split()[1] == "*" and "*" not in lines["tiny"]
    big_flips = [0.4, 0.4] + [0.9] * 98 + [0.1] * 100 + [0.9] + [0.1] * 9
    report = compare("cpu-int8", policies, ["q"] * 210, labels, torch_scores, big_flips, thresholds)
    assert report.agreement > 0.99 and not report.passed
    assert any("macro-F1 moved 1.01 points" in f for f in report.failures)


def test_manifest_checksum_mismatch_names_file(tiny_exported_model: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_exported_model, tmp_path / "m")
    Manifest.load(folder)  # the fixture is valid
    with open(folder / MODEL_FILE, "r+b") as handle:
        handle.seek(-8, 2)
        handle.write(b"\x00" * 8)
    with pytest.raises(ManifestError, match=r"model\.onnx: checksum mismatch"):
        Manifest.load(folder)


def test_manifest_missing_file_and_invalid_manifest(tiny_exported_model: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_exported_model, tmp_path / "m")
    (folder / TOKENIZER_FILE).unlink()
    with pytest.raises(ManifestError, match=r"tokenizer\.json: tokenizer file listed in manifest\.json is missing"):
        Manifest.load(folder)

    folder = shutil.copytree(tiny_exported_model, tmp_path / "m2")
    raw = json.loads((folder / MANIFEST_FILE).read_text())
    raw["target"] = "tpu-int4"
    (folder / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=r"manifest\.json: invalid or incompatible manifest"):
        Manifest.load(folder)

    (folder / MANIFEST_FILE).unlink()
    with pytest.raises(ManifestError, match=r"manifest\.json: missing"):
        Manifest.load(folder)


def test_tiny_exported_model_fixture(tiny_exported_model: Path) -> None:
    manifest = Manifest.load(tiny_exported_model)
    assert manifest.target == "cpu-fp32" and manifest.parity["passed"]
    assert manifest.parity["rows_source"].startswith("policy examples")  # no val rows: the policies' examples


def test_cuda_fp16_structure(decisive_checkpoint: Path, val_rows: list, tmp_path: Path) -> None:
    import onnx

    out = tmp_path / "cuda"
    manifest = export_checkpoint(decisive_checkpoint, out, "cuda-fp16", val_rows=val_rows[::4])
    model = onnx.load(str(out / MODEL_FILE))
    onnx.checker.check_model(model)
    floats = [i for i in model.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    fp16 = [i for i in floats if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(fp16) >= 0.9 * len(floats) and fp16
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types
    assert manifest.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert manifest.export["structure"]["fp16_share"] >= 0.9
    assert {"Attention", "SkipLayerNormalization"} <= set(manifest.export["optimization"]["fusions"])
    assert manifest.parity["passed"]  # ONNX Runtime's CPU fp16 kernels run it here
    assert (out / MODEL_FILE).stat().st_size < 0.6 * (decisive_checkpoint / "model.safetensors").stat().st_size


def test_detect_isa(tmp_path: Path) -> None:
    vnni = tmp_path / "vnni"
    vnni.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert detect_isa(vnni) == "avx512_vnni" and detect_isa(avx2) == "avx2"
    assert detect_isa(tmp_path / "missing") == "avx2"


def test_refuses_to_replace_a_foreign_folder(decisive_checkpoint: Path, tmp_path: Path) -> None:
    from export.onnx import ExportError

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an exported model"):
        export_checkpoint(decisive_checkpoint, tmp_path, "cpu-fp32")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_load_val_rows_errors_name_the_file(decisive_checkpoint: Path, tmp_path: Path) -> None:
    from export.cli import load_val_rows

    meta = CheckpointMeta.load(decisive_checkpoint)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"text": "hi", "label": "safe", "policy": "toxicity"}\n{"text": "x", "label": "meh", "policy": "toxicity"}\n'
    )
    with pytest.raises(SystemExit, match=r"bad\.jsonl:2: invalid row"):
        load_val_rows([bad], meta)
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"text": "hi", "label": "safe", "policy": "no_such_policy"}\n')
    with pytest.raises(SystemExit, match=r"unknown policy 'no_such_policy'"):
        load_val_rows([unknown], meta, split="all")
    good = tmp_path / "good"
    good.mkdir()
    lines = [{"text": f"q{i}", "label": "unsafe" if i % 2 else "safe", "policy": "toxicity"} for i in range(10)]
    lines.append({"text": "file my taxes", "label": "unsafe", "policy": "tax_advice"})
    (good / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    # By default only the rows the training split function puts in "val" are kept.
    assert sorted(r[1] for r in load_val_rows([good], meta)) == ["q6", "q7", "q9"]
    rows = load_val_rows([good], meta, max_per_policy=4, split="all")
    toxicity = next(p.instruction_text for p in meta.policies if p.name == "toxicity")
    assert len(rows) == 5 and sum(r[0] == toxicity for r in rows) == 4
    assert ("file my taxes", 1) in [(r[1], r[2]) for r in rows]


def test_model_card(int8_export: Path) -> None:
    manifest = Manifest.load(int8_export)
    path = write_model_card(int8_export, manifest, {"summary": "A tiny test guard.", "how_to_rebuild": ["make model"]})
    card = path.read_text()
    assert card.startswith("# tiny-guard 1.2.3 (cpu-int8)")
    for heading in (
        "## Intended use",
        "## Policies",
        "## Data sources and licenses",
        "## Measured metrics",
        "## Parity with the torch checkpoint",
        "## Size on disk",
        "## Limitations",
        "## How to rebuild",
    ):
        assert heading in card
    assert "| toxicity | 0.500 |" in card and "Apache-2.0" in card and "| **macro** |" in card
    assert "Attention mode `full`" in card
    assert "verdict agreement" in card and "model.onnx" in card
    Manifest.load(int8_export)  # the card is not part of the checksummed files


def test_recalibration_refits_only_policies_with_enough_rows_of_each_label() -> None:
    from export.onnx import recalibrate_thresholds

    rng = np.random.default_rng(0)
    big_scores = list(rng.uniform(0.0, 0.5, 40)) + list(rng.uniform(0.6, 1.0, 40))
    big_labels = [0] * 40 + [1] * 40
    small_scores, small_labels = [0.1, 0.95, 0.97, 0.2], [0, 1, 1, 0]
    policies = ["big"] * 80 + ["small"] * 4
    thresholds = {"big": 0.05, "small": 0.3}
    refitted = recalibrate_thresholds(
        policies, big_labels + small_labels, big_scores + small_scores, thresholds, "f1", 0.1, min_rows=30
    )
    assert refitted == ["big"]
    assert thresholds["small"] == 0.3  # two rows per label: kept
    assert 0.5 <= thresholds["big"] <= 0.6  # separable: re-fitted into the gap


@pytest.fixture(scope="module")
def decisive_prefix_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint trained in prefix mode on the synthetic rows (as `decisive_checkpoint`)."""
    return fit_synthetic(tiny_checkpoint, tmp_path_factory.mktemp("decisive_prefix") / "ckpt", "prefix", 300)


def test_prefix_export_int8_parity_size_and_engine(decisive_prefix_checkpoint: Path, tmp_path: Path) -> None:
    """A prefix-mode checkpoint exports to one int8 graph that passes the gate against torch prefix mode."""
    rows = synthetic_rows(CheckpointMeta.load(decisive_prefix_checkpoint))
    int8 = export_checkpoint(decisive_prefix_checkpoint, tmp_path / "int8", "cpu-int8", val_rows=rows)
    fp32 = export_checkpoint(decisive_prefix_checkpoint, tmp_path / "fp32", "cpu-fp32", val_rows=rows)
    for m in (int8, fp32):
        assert m.encoding.mode == "prefix" and m.kv_layout is not None and m.input_names == m.kv_layout.input_names()
        assert m.parity["passed"] and m.parity["agreement"] >= 0.99 and m.metrics["macro"]["f1"] > 0.8
    assert fp32.parity["max_abs_diff"] < 1e-4
    fp32_nodes = int8.export["quantization"]["fp32_nodes"]  # the FFN output projections and all of layer 0
    assert "/layer.1/output/dense/MatMul" in fp32_nodes and "/layer.1/intermediate/dense/MatMul" not in fp32_nodes
    assert {"/layer.0/attention/self/query/MatMul", "/layer.0/intermediate/dense/MatMul"} <= set(fp32_nodes)
    assert int8.export["quantization"]["fp32_weights_stored_as"].startswith("float16")
    assert (tmp_path / "int8" / MODEL_FILE).stat().st_size < 0.35 * (tmp_path / "fp32" / MODEL_FILE).stat().st_size
    assert sorted(p.name for p in (tmp_path / "int8").iterdir()) == [MANIFEST_FILE, MODEL_FILE, TOKENIZER_FILE]


def test_int8_that_fails_the_gate_is_rebuilt_with_more_fp32_nodes(
    decisive_prefix_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An int8 graph that fails the parity gate is rebuilt with the next rung of fp32 MatMuls; the manifest says
    which rung shipped and which failed. When every rung fails, the export fails and writes nothing."""
    import export.onnx as onnx_export
    from export.parity import ParityError, ParityReport

    rows = synthetic_rows(CheckpointMeta.load(decisive_prefix_checkpoint))
    real_check, calls = onnx_export.check, []

    def fail_first(report: ParityReport) -> None:  # the first graph "fails"; later ones face the real gate
        calls.append(report.agreement)
        if len(calls) == 1:
            raise ParityError(report.model_copy(update={"passed": False, "failures": ["forced by the test"]}))
        real_check(report)

    monkeypatch.setattr(onnx_export, "check", fail_first)
    manifest = export_checkpoint(decisive_prefix_checkpoint, tmp_path / "int8", "cpu-int8", val_rows=rows)
    quantization = manifest.export["quantization"]
    assert len(calls) == 2 and manifest.parity["passed"]
    assert quantization["fp32_rung"] == "all_encoder_matmuls"
    assert [f["fp32_rung"] for f in quantization["failed_rungs"]] == ["ffn_output+layer0"]
    assert "/layer.1/intermediate/dense/MatMul" in quantization["fp32_nodes"]

    def always_fail(report: ParityReport) -> None:
        raise ParityError(report.model_copy(update={"passed": False, "failures": ["forced by the test"]}))

    monkeypatch.setattr(onnx_export, "check", always_fail)
    with pytest.raises(ParityError):
        export_checkpoint(decisive_prefix_checkpoint, tmp_path / "failed", "cpu-int8", val_rows=rows)
    assert not (tmp_path / "failed").exists()


def test_prefix_cuda_fp16_structure(decisive_prefix_checkpoint: Path, tmp_path: Path) -> None:
    import onnx

    rows = synthetic_rows(CheckpointMeta.load(decisive_prefix_checkpoint))[::4]
    manifest = export_checkpoint(decisive_prefix_checkpoint, tmp_path / "cuda", "cuda-fp16", val_rows=rows)
    model = onnx.load(str(tmp_path / "cuda" / MODEL_FILE))
    assert manifest.export["structure"]["fp16_share"] >= 0.9 and manifest.parity["passed"]
    float_io = [
        v
        for v in [*model.graph.input, *model.graph.output]
        if v.name.startswith(("policy_k", "policy_v", "present", "logits"))
    ]
    assert float_io and all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in float_io)  # keep_io_types


def test_fp32_weights_are_stored_as_fp16_and_folded_at_load(tmp_path: Path) -> None:
    """The MatMuls kept in fp32 store their weights as float16 behind a Cast: the file is about half as large, ONNX
    Runtime folds the casts when the session loads (no Cast left to run), and the outputs move by fp16 rounding only."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export.onnx import store_fp32_weights_as_fp16

    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 128)).astype(np.float32)
    small = rng.normal(size=(128, 2)).astype(np.float32)  # below min_elements: left as it is
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "small"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(small, "small")],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    x = rng.normal(size=(3, 64)).astype(np.float32)
    before, size = ort.InferenceSession(str(path)).run(None, {"x": x})[0], path.stat().st_size

    assert store_fp32_weights_as_fp16(path).startswith("float16 (1 MatMul")
    stored = onnx.load(str(path))
    dtypes = {t.name: t.data_type for t in stored.graph.initializer}
    assert dtypes == {"w_fp16": TensorProto.FLOAT16, "small": TensorProto.FLOAT}
    assert [n.op_type for n in stored.graph.node] == ["Cast", "MatMul", "MatMul"]
    assert path.stat().st_size < 0.6 * size
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    after = ort.InferenceSession(str(path), options).run(None, {"x": x})[0]
    assert "Cast" not in {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    np.testing.assert_allclose(after, before, rtol=2e-2, atol=2e-2)
    assert not np.array_equal(after, before)  # the weights really are rounded
    assert store_fp32_weights_as_fp16(path) == "float32"  # nothing left to convert
