"""Export a UniGuard checkpoint to an ONNX model folder: model.onnx + tokenizer.json + manifest.json.

Steps: optimum exports the Hugging Face sequence classifier (dynamic batch and sequence axes) ->
ONNX Runtime's transformer optimizer fuses attention, layer norms and GELU -> per target:
``cpu-fp32`` keeps fp32, ``cpu-int8`` quantises dynamically to int8 with the config for this CPU
(AVX-512 VNNI or AVX2), ``cuda-fp16`` converts to fp16 for the CUDA execution provider. The result
is checked structurally and scored against the torch checkpoint on validation rows (the parity
gate, ``export.parity``); only then is the folder moved into place, so a failed export leaves
nothing behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from export.manifest import MANIFEST_FILE, KVLayout, Manifest, Target, file_entry
from export.parity import ParityError, check, compare
from export.prefix import export_prefix_raw, kv_layout
from policies.instruction import Window, encoder_from_config
from policies.registry import PolicyRegistry
from scoring.core import Scorer
from scoring.onnx import EngineError, OnnxEngine
from training.encoders import portable_name
from training.meta import CheckpointMeta
from training.metrics import binary_metrics, calibrate_threshold, macro

log = logging.getLogger("uniguard.export")

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
OUTPUT_NAME = "logits"
Isa = Literal["avx512_vnni", "avx2"]
# Encoders whose attention/layer-norm/GELU pattern ONNX Runtime's "bert" optimizer fuses.
BERT_LIKE = {"bert", "roberta", "xlm-roberta", "electra", "camembert", "mpnet"}
# A cuda-fp16 model must hold (by element count) at least this share of its float weights in fp16.
MIN_FP16_SHARE = 0.9

ValRow = tuple[str, str, int]  # (policy instruction text, query, label 0/1)


class ExportError(RuntimeError):
    """The checkpoint or the output folder cannot be used; the message names it and the fix."""


# --------------------------------------------------------------------------- CPU and quantisation


def detect_isa(cpuinfo: Path = Path("/proc/cpuinfo")) -> Isa:
    """``avx512_vnni`` if the CPU flags list AVX-512 VNNI, else ``avx2``."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "avx2"
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return "avx512_vnni" if flags & {"avx512_vnni", "avx512vnni"} else "avx2"


def quantization_config(isa: Isa, per_channel: bool = True) -> Any:
    """optimum's dynamic-quantisation config for the instruction set.

    Without VNNI, u8 x s8 products go through 16-bit saturating adds (vpmaddubsw), so the AVX2
    config uses 7-bit weights (``reduce_range``) to avoid overflow, as ONNX Runtime recommends.
    """
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    if isa == "avx512_vnni":
        return AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=per_channel)
    return AutoQuantizationConfig.avx2(is_static=False, per_channel=per_channel, reduce_range=True)


def _describe_quantization(config: Any, isa: Isa) -> dict[str, Any]:
    def name(value: Any) -> str:
        return str(getattr(value, "name", getattr(value, "value", value)))

    return {
        "tool": "onnxruntime.quantization.quantize_dynamic",
        "config": f"optimum AutoQuantizationConfig.{isa}(is_static=False)",
        "isa": isa,
        "mode": "dynamic",
        "weights_dtype": name(config.weights_dtype),
        "activations_dtype": name(config.activations_dtype),
        "weights_symmetric": bool(config.weights_symmetric),
        "activations_symmetric": bool(config.activations_symmetric),
        "per_channel": bool(config.per_channel),
        "reduce_range": bool(config.reduce_range),
        "operators": [name(op) for op in config.operators_to_quantize],
    }


# The feed-forward output projections (``layer.N/output/dense``) see GELU activations with large
# outliers; quantising their inputs per tensor moved MiniLM scores by up to 0.3 and flipped ~3% of
# verdicts. Keeping just those six MatMuls in fp32 (and 7-bit weights everywhere) brought verdict
# agreement to 99.5% at 34 MB (measured in docs/EXPORT.md). The first layer's MatMuls stay in fp32 too: they read
# the int8 embeddings, and quantising their inputs again put a prefix-mode model at 98.9% agreement (gate: 99%);
# with layer 0 in fp32 it passed at 99.4% for 3 MB more (docs/EXPORT.md, *Which nodes stay fp32*).
FP32_NODE_PATTERN = re.compile(r"/layer\.\d+/output/dense/MatMul$|/layer\.0/.*MatMul$")
# The int8 rungs, tried in order until the parity gate passes: the first is ``FP32_NODE_PATTERN``, the second keeps
# every encoder MatMul in fp32 (only the embeddings and the head int8; 99.8% agreement where the first gave 98.9%).
# The fp32 MatMuls' weights are stored as fp16 (``store_fp32_weights_as_fp16``), so the second rung of MiniLM is
# 33.5 MB, not 55. A checkpoint that fails both fails the export (docs/EXPORT.md).
FP32_RUNGS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("ffn_output+layer0", FP32_NODE_PATTERN),
    ("all_encoder_matmuls", re.compile(r"/layer\.\d+/.*MatMul$")),
)
QUANTIZED_OPS = ["MatMul", "Attention", "EmbedLayerNormalization", "Gather"]


def quantize(src: Path, dst: Path, isa: Isa, per_channel: bool = True, rung: int = 0) -> dict[str, Any]:
    """Dynamic int8 quantisation of ``src`` into ``dst`` with optimum's config for ``isa``.

    ONNX Runtime's quantizer is called directly (with optimum's settings) because the fused
    contrib operators defeat shape inference; ``DefaultTensorType`` tells it they produce float.
    The MatMuls of ``FP32_RUNGS[rung]`` stay in fp32 (rung 0: the feed-forward output projections and layer 0).
    """
    rung_name, fp32_pattern = FP32_RUNGS[rung]
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    config = quantization_config(isa, per_channel)
    info = _describe_quantization(config, isa)
    graph = onnx.load(str(src), load_external_data=False).graph
    excluded = [n.name for n in graph.node if n.op_type == "MatMul" and fp32_pattern.search(n.name)]
    info.update(operators=QUANTIZED_OPS, reduce_range=True, fp32_rung=rung_name, fp32_nodes=excluded)
    quantize_dynamic(
        src,
        dst,
        op_types_to_quantize=QUANTIZED_OPS,
        per_channel=config.per_channel,
        reduce_range=True,
        weight_type=config.weights_dtype,
        nodes_to_exclude=excluded,
        extra_options={
            "WeightSymmetric": config.weights_symmetric,
            "ActivationSymmetric": config.activations_symmetric,
            "DefaultTensorType": onnx.TensorProto.FLOAT,
        },
    )
    info["fp32_weights_stored_as"] = store_fp32_weights_as_fp16(dst)
    return info


def store_fp32_weights_as_fp16(path: Path, min_elements: int = 1024) -> str:
    """Store the weight matrices of the MatMuls left in fp32 as float16, each behind a ``Cast`` to float32.

    ONNX Runtime folds the casts at session start (constant folding), so the session computes in fp32 exactly as
    before, with weights rounded to fp16 (relative error ~5e-4, far below int8's); the file carries half the bytes
    (the second rung of MiniLM: 55 MB -> 34 MB, docs/EXPORT.md). Returns what the manifest records."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    casts = []
    for name in sorted({n.input[1] for n in graph.node if n.op_type == "MatMul" and len(n.input) > 1}):
        tensor = weights.get(name)
        if tensor is None or name in graph_inputs or tensor.data_type != TensorProto.FLOAT:
            continue
        array = numpy_helper.to_array(tensor)
        if array.size < min_elements:
            continue
        graph.initializer.remove(tensor)
        graph.initializer.append(numpy_helper.from_array(array.astype(np.float16), f"{name}_fp16"))
        casts.append(helper.make_node("Cast", [f"{name}_fp16"], [name], to=TensorProto.FLOAT, name=f"{name}_cast"))
    if not casts:
        return "float32"
    nodes = casts + list(graph.node)  # the casts read initializers only: first is a valid topological order
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(path))
    return f"float16 ({len(casts)} MatMul weights, cast to float32 when the session loads)"


# --------------------------------------------------------------------------- export and optimisation


def export_raw(checkpoint: Path, work: Path) -> Path:
    """optimum's text-classification export (dynamic batch and sequence axes) into ``work``."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from optimum.exporters.onnx import main_export

    main_export(
        str(checkpoint),
        work,
        task="text-classification",
        library_name="transformers",
        local_files_only=True,
        do_validation=False,  # the parity gate below is the (stricter) validation
    )
    path = work / MODEL_FILE
    if not path.is_file():
        raise ExportError(f"{checkpoint}: optimum produced no {MODEL_FILE} in {work}")
    return path


def optimize(src: Path, dst: Path, checkpoint: Path, gpu: bool, prefix: bool = False) -> dict[str, Any]:
    """ONNX Runtime transformer fusions, with head count and width from the checkpoint's config.

    CPU: fusions + ONNX Runtime's basic (hardware-independent) graph optimisations. GPU: fusions
    only (no CUDA needed to build it), then fp16 with float inputs/outputs kept (``keep_io_types``).
    Prefix graphs skip the EmbedLayerNormalization fusion: their query positions start after the policy
    (an explicit ``position_ids`` input), which the quantised QEmbedLayerNormalization cannot take; the
    embedding Gathers are quantised on their own instead.
    """
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint, local_files_only=True)
    info: dict[str, Any] = {"tool": "onnxruntime.transformers.optimizer", "model_type": config.model_type}
    if config.model_type not in BERT_LIKE:
        log.warning("no transformer fusions for model type %r; keeping the exported graph", config.model_type)
        model = onnx.load(str(src))
        if gpu:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = convert_float_to_float16(model, keep_io_types=True)
            info["fp16"] = {"keep_io_types": True}
        onnx.save(model, str(dst))
        info["fusions"] = {}
        return info
    opt_level = 0 if gpu else 1
    options = FusionOptions("bert")
    if prefix:
        options.enable_embed_layer_norm = False
    optimized = optimize_model(
        str(src),
        model_type="bert",
        num_heads=int(config.num_attention_heads),
        hidden_size=int(config.hidden_size),
        opt_level=opt_level,
        use_gpu=gpu,
        optimization_options=options,
    )
    info.update(
        {
            "num_heads": int(config.num_attention_heads),
            "hidden_size": int(config.hidden_size),
            "opt_level": opt_level,
            "fusions": {k: v for k, v in optimized.get_fused_operator_statistics().items() if v},
        }
    )
    if gpu:
        optimized.convert_float_to_float16(keep_io_types=True)
        info["fp16"] = {"keep_io_types": True}
    optimized.save_model_to_file(str(dst))
    return info


# --------------------------------------------------------------------------- structure


def graph_io(path: Path) -> tuple[list[str], list[str]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output]


def structure(path: Path, reference: Path) -> dict[str, Any]:
    """Check an exported graph: ONNX checker, same inputs/outputs as the raw fp32 export, weight dtypes."""
    import onnx

    onnx.checker.check_model(str(path))
    model = onnx.load(str(path))
    inputs, outputs = graph_io(path)
    ref_inputs, ref_outputs = graph_io(reference)
    if (inputs, outputs) != (ref_inputs, ref_outputs):
        raise ExportError(
            f"{path}: inputs/outputs {inputs}/{outputs} differ from the fp32 export's {ref_inputs}/{ref_outputs}"
        )
    elements: dict[str, int] = {}
    for init in model.graph.initializer:
        dtype = onnx.TensorProto.DataType.Name(init.data_type)
        elements[dtype] = elements.get(dtype, 0) + int(np.prod(init.dims, dtype=np.int64))
    floats = elements.get("FLOAT", 0) + elements.get("FLOAT16", 0)
    output_types = [onnx.TensorProto.DataType.Name(o.type.tensor_type.elem_type) for o in model.graph.output]
    return {
        "checker": "passed",
        "inputs": inputs,
        "outputs": outputs,
        "output_types": output_types,
        "initializer_elements": elements,
        "fp16_share": (elements.get("FLOAT16", 0) / floats) if floats else 0.0,
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0),
    }


# --------------------------------------------------------------------------- scoring


def score_with_progress(scorer: Scorer, windows: list[list[Window]], batch_size: int, desc: str) -> list[float]:
    """P(unsafe) per pair (max over its windows) through the scoring core, with a progress bar."""
    from tqdm import tqdm

    with tqdm(total=sum(len(w) for w in windows), desc=desc, unit="window", leave=False, disable=None) as bar:
        return [s.score for s in scorer.score_windows(windows, batch_size, bar.update)]


# --------------------------------------------------------------------------- metrics


def policy_names(meta: CheckpointMeta, instructions: Sequence[str]) -> list[str]:
    """The policy name of each instruction text: the checkpoint's policies, then the default registry."""
    known = {p.instruction_text: p.name for p in meta.policies}
    missing = {text for text in instructions if text not in known}
    if missing:
        for policy in PolicyRegistry.load():
            known.setdefault(policy.instruction_text(), policy.name)
    names = []
    for text in instructions:
        if text not in known:
            known[text] = "custom_" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
        names.append(known[text])
    return names


def measure(
    policies: Sequence[str], labels: Sequence[int], scores: Sequence[float], thresholds: dict[str, float]
) -> dict[str, Any]:
    """Per-policy binary metrics at the manifest's thresholds, and their macro average."""
    pol = np.asarray(policies, dtype=object)
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    per_policy = {
        name: binary_metrics(s[pol == name], y[pol == name], thresholds[name]).model_dump()
        for name in sorted(set(policies))
    }
    keys = ("precision", "recall", "f1", "fpr")
    macro_metrics: dict[str, float | None] = {k: macro([m[k] for m in per_policy.values()]) for k in keys}
    aurocs = [m["auroc"] for m in per_policy.values() if m["auroc"] is not None]
    macro_metrics["auroc"] = macro(aurocs) if aurocs else None
    return {"rows": len(policies), "per_policy": per_policy, "macro": macro_metrics}


# --------------------------------------------------------------------------- folder handling


def _staging_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise ExportError(
            f"{out}: folder exists and is not an exported model (no {MANIFEST_FILE}); "
            "refusing to replace it: choose an empty or new --out"
        )


def _move_into_place(staging: Path, out: Path) -> None:
    """Replace ``out`` (absent, empty or a previous export) with the finished ``staging`` folder."""
    old: Path | None = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("onnxruntime", "onnx", "optimum-onnx", "optimum", "torch", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


# --------------------------------------------------------------------------- the export, in phases


class Recalibration(BaseModel):
    """How the export re-fits per-policy thresholds on the ONNX scores of the validation rows
    (objectives: see ``training.metrics.calibrate_threshold``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    objective: Literal["f1", "balanced"] = "f1"
    target_fpr: float | None = None  # best recall with a false-positive rate at most this
    min_rows: int = 30  # re-fit only policies with at least this many rows of each label

    def describe(self, refitted: Sequence[str]) -> str:
        fpr = f", false-positive rate <= {self.target_fpr}" if self.target_fpr is not None else ""
        return (
            f"recalibrated (best {self.objective} objective{fpr}) on the ONNX scores of these rows for "
            f"{', '.join(refitted) or 'no policy'}; the checkpoint's for policies with fewer than {self.min_rows} "
            "rows of either label"
        )


class ExportPlan(BaseModel):
    """Phase 1: what to export, checked before any work (checkpoint, output folder, validation rows)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    checkpoint: Path
    out: Path
    target: Target
    meta: CheckpointMeta
    rows: list[ValRow]
    rows_source: str
    name: str
    version: str
    isa: Isa | None = None
    skip_parity: bool = False
    recalibrate: Recalibration | None = None
    batch_size: int = 32
    kv_layout: KVLayout | None = None  # prefix-mode checkpoints


class GraphBuild(BaseModel):
    """Phase 2: the graph in the staging folder and how it was made (``manifest.export``)."""

    input_names: list[str]
    output_name: str
    export: dict[str, Any]


class Evaluation(BaseModel):
    """Phase 3: the staged model scored by the service's engine; the parity gate's and the metrics' figures."""

    thresholds: dict[str, float]
    metrics: dict[str, Any]
    parity: dict[str, Any]


def plan_export(
    checkpoint: Path,
    out: Path,
    target: Target,
    val_rows: list[ValRow] | None,
    name: str | None,
    version: str | None,
    **options: Any,
) -> ExportPlan:
    checkpoint, out = Path(checkpoint), Path(out)
    for required in ("config.json", TOKENIZER_FILE):
        if not (checkpoint / required).is_file():
            raise ExportError(f"{checkpoint / required}: missing; --model must be a UniGuard checkpoint folder")
    meta = CheckpointMeta.load(checkpoint)
    _check_out(out)
    rows_source = "validation rows"
    if val_rows is None:
        val_rows, rows_source = _policy_example_rows(meta), "policy examples (no validation rows given)"
    layout = None
    if meta.encoding.mode == "prefix":
        from tokenizers import Tokenizer

        encoder = encoder_from_config(Tokenizer.from_file(str(checkpoint / TOKENIZER_FILE)), meta.encoding)
        layout = kv_layout(checkpoint, encoder.max_segment_len)
    return ExportPlan(
        kv_layout=layout,
        checkpoint=checkpoint,
        out=out,
        target=target,
        meta=meta,
        rows=val_rows,
        rows_source=rows_source,
        name=name or meta.name,
        version=version or datetime.now(UTC).strftime("%Y.%m.%d"),
        **options,
    )


def _export_and_optimize(plan: ExportPlan, work: Path, optimized: Path) -> tuple[Path, dict[str, Any]]:
    """The raw ONNX export of the checkpoint into ``work`` and its optimised graph at ``optimized``."""
    checkpoint, layout = plan.checkpoint, plan.kv_layout
    info: dict[str, Any] = {}
    if layout is not None:
        log.info("exporting %s (prefix mode) with torch.onnx.export", checkpoint)
        raw = export_prefix_raw(checkpoint, work / "raw", layout)
        info["exporter"] = "torch.onnx.export(training.prefix.PrefixGraph)"
        info["dynamic_axes"] = {"batch": 0, "query": 1, "policies": "bank axis 0", "policy_len": "bank axis 2"}
    else:
        log.info("exporting %s with optimum", checkpoint)
        raw = export_raw(checkpoint, work / "raw")
        info["exporter"] = "optimum.exporters.onnx.main_export(task='text-classification')"
        info["dynamic_axes"] = {"batch": 0, "sequence": 1}
    log.info("optimising the graph for %s", plan.target)
    gpu = plan.target == "cuda-fp16"
    info["optimization"] = optimize(raw, optimized, checkpoint, gpu=gpu, prefix=layout is not None)
    return raw, info


def build_graph(
    plan: ExportPlan, staging: Path, work: Path, rung: int = 0, optimized: dict[str, Any] | None = None
) -> GraphBuild:
    """Export, optimise and (per target) quantise or convert the graph into ``staging``; structural checks.
    ``work``: a scratch folder. cpu-int8: ``rung`` of ``FP32_RUNGS``; ``optimized`` keeps the optimised graph
    (in ``work``) across calls, so the next rung only quantises again."""
    target, layout = plan.target, plan.kv_layout
    info: dict[str, Any] = {"target": target, "mode": plan.meta.encoding.mode, "versions": _versions()}
    model_path = staging / MODEL_FILE
    if target == "cpu-int8":
        done = optimized if optimized is not None else {}
        if not done:
            done["raw"], done["info"] = _export_and_optimize(plan, work, work / "optimized.onnx")
        raw = done["raw"]
        info.update(done["info"])
        chosen = plan.isa or detect_isa()
        log.info("quantising to int8 for %s", chosen)
        info["quantization"] = quantize(work / "optimized.onnx", model_path, chosen, rung=rung)
    else:
        raw, done = _export_and_optimize(plan, work, model_path)
        info.update(done)
    shutil.copyfile(plan.checkpoint / TOKENIZER_FILE, staging / TOKENIZER_FILE)
    info["structure"] = struct = structure(model_path, raw)
    if target == "cuda-fp16" and struct["fp16_share"] < MIN_FP16_SHARE:
        raise ExportError(f"{model_path}: only {struct['fp16_share']:.0%} of the float weights are fp16")
    if set(struct["output_types"]) != {"FLOAT"}:
        raise ExportError(f"{model_path}: outputs must be float32, got {struct['output_types']}")
    info["opset"] = struct["opset"]
    info["skip_parity"] = plan.skip_parity
    input_names, output_names = graph_io(model_path)
    if layout is not None and (input_names, output_names) != (layout.input_names(), layout.output_names()):
        raise ExportError(f"{model_path}: inputs/outputs {input_names}/{output_names} differ from the prefix layout")
    return GraphBuild(input_names=input_names, output_name=output_names[0], export=info)


def stage_manifest(plan: ExportPlan, build: GraphBuild, staging: Path, evaluation: Evaluation | None) -> Manifest:
    """Write the staging folder's manifest: provisional (no figures yet) so the service's engine can load the folder
    for the gate, then final with the gate's figures."""
    meta = plan.meta
    thresholds = (
        evaluation.thresholds
        if evaluation
        else {p.name: meta.thresholds.get(p.name, meta.default_threshold) for p in meta.policies}
    )
    names = {p.name for p in meta.policies}
    manifest = Manifest(
        name=plan.name,
        version=plan.version,
        base_model=portable_name(meta.base_model),
        target=plan.target,
        recipe=meta.recipe,
        policies=meta.policies,
        encoding=meta.encoding,
        thresholds={k: v for k, v in thresholds.items() if k in names},
        default_threshold=meta.default_threshold,
        input_names=build.input_names,
        output_name=build.output_name,
        kv_layout=plan.kv_layout,
        files={"model": file_entry(staging, MODEL_FILE), "tokenizer": file_entry(staging, TOKENIZER_FILE)},
        data_sources=meta.data_sources,
        metrics=evaluation.metrics if evaluation else {},
        parity=evaluation.parity if evaluation else {},
        export=build.export,
    )
    manifest.save(staging)
    return manifest


def export_checkpoint(
    checkpoint: Path,
    out: Path,
    target: Target,
    val_rows: list[ValRow] | None = None,
    name: str | None = None,
    version: str | None = None,
    *,
    skip_parity: bool = False,
    recalibrate: Recalibration | None = None,
    isa: Isa | None = None,
    batch_size: int = 32,
) -> Manifest:
    """Export ``checkpoint`` to the model folder ``out`` for ``target``; return its manifest.

    ``val_rows`` (instruction text, query, label) feed the parity gate and the metrics recorded in
    the manifest. Without them, the gate runs on the policies' own examples from the registry.
    With ``recalibrate`` (see ``Recalibration``), per-policy thresholds are re-fitted on the ONNX scores
    of the rows. Raises ``ParityError`` (nothing is written) when the gate fails.
    """
    plan = plan_export(
        checkpoint,
        out,
        target,
        val_rows,
        name,
        version,
        isa=isa,
        skip_parity=skip_parity,
        recalibrate=recalibrate,
        batch_size=batch_size,
    )
    staging = _staging_dir(plan.out)
    try:
        build, evaluation = build_and_gate(plan, staging)
        manifest = stage_manifest(plan, build, staging, evaluation)
        staging.chmod(0o755)  # mkdtemp makes it private; the service may run as another user
        _move_into_place(staging, plan.out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s (%.1f MB)", plan.out, (plan.out / MODEL_FILE).stat().st_size / 1e6)
    return manifest


def build_and_gate(plan: ExportPlan, staging: Path) -> tuple[GraphBuild, Evaluation]:
    """Build the graph and pass it through the gate; a cpu-int8 graph that fails is rebuilt with the next rung of
    ``FP32_RUNGS`` (more MatMuls in fp32), and the failed rungs are recorded under ``export.quantization``. The
    last rung's failure is the export's (``ParityError``)."""
    rungs = len(FP32_RUNGS) if plan.target == "cpu-int8" else 1
    failed: list[dict[str, Any]] = []
    torch_cache: dict[str, list[float]] = {}  # the checkpoint is scored once, whatever the rung
    optimized: dict[str, Any] = {}  # and the graph exported and optimised once: rungs differ in quantisation only
    with tempfile.TemporaryDirectory(prefix="uniguard-export-") as tmp:
        for rung in range(rungs):
            build = build_graph(plan, staging, Path(tmp), rung, optimized)
            if failed:
                build.export["quantization"]["failed_rungs"] = failed
            stage_manifest(plan, build, staging, None)
            try:
                return build, gate_and_measure(plan, staging, torch_cache)
            except ParityError as exc:
                if rung + 1 == rungs:
                    raise
                name = FP32_RUNGS[rung][0]
                failed.append(
                    {
                        "fp32_rung": name,
                        "agreement": exc.report.agreement,
                        "f1_delta_points": exc.report.f1_delta_points,
                    }
                )
                log.warning(
                    "int8 with %s in fp32 failed the parity gate (%.2f%% agreement); retrying with %s in fp32",
                    name,
                    100 * exc.report.agreement,
                    FP32_RUNGS[rung + 1][0],
                )
    raise AssertionError("unreachable: the last rung returns or raises")


def _policy_example_rows(meta: CheckpointMeta) -> list[ValRow]:
    registry = PolicyRegistry.load()
    rows: list[ValRow] = []
    for ref in meta.policies:
        if ref.name in registry:
            rows += [(ref.instruction_text, ex.text, int(ex.label == "unsafe")) for ex in registry[ref.name].examples]
    return rows


def recalibrate_thresholds(
    policies: Sequence[str],
    labels: Sequence[int],
    scores: Sequence[float],
    thresholds: dict[str, float],
    objective: str,
    target_fpr: float | None,
    min_rows: int,
) -> list[str]:
    """Re-fit ``thresholds`` in place on these scores, for the policies with at least ``min_rows`` rows of each
    label (a threshold fitted on a dozen rows is noise: the others keep theirs). Returns the re-fitted names."""
    pol, y, s = np.asarray(policies, dtype=object), np.asarray(labels), np.asarray(scores)
    refitted = []
    for p in sorted(set(policies)):
        mask = pol == p
        if min(int((y[mask] == 1).sum()), int((y[mask] == 0).sum())) < min_rows:
            continue
        thresholds[p] = calibrate_threshold(
            s[mask], y[mask], default=thresholds[p], objective=objective, target_fpr=target_fpr
        )
        refitted.append(p)
    return refitted


def gate_and_measure(plan: ExportPlan, staging: Path, torch_cache: dict[str, list[float]] | None = None) -> Evaluation:
    """Score the rows with the staged model through the service's engine (and with the torch checkpoint through
    the same scoring core, on the same windows, unless parity is skipped): metrics, thresholds and the gate.
    ``torch_cache``: the checkpoint's scores kept across calls (they do not depend on the graph, e.g. its rung)."""
    meta, target = plan.meta, plan.target
    thresholds = {p.name: meta.thresholds.get(p.name, meta.default_threshold) for p in meta.policies}
    if not plan.rows:
        if plan.skip_parity:
            return Evaluation(
                thresholds=thresholds,
                metrics={},
                parity=_skipped("--skip-parity and no validation rows", plan.rows_source),
            )
        raise ExportError("no validation rows and no policy examples: pass --val FILE_OR_DIR (or --skip-parity)")
    instructions = [r[0] for r in plan.rows]
    queries = [r[1] for r in plan.rows]
    labels = [int(r[2]) for r in plan.rows]
    policies = policy_names(meta, instructions)
    for p in set(policies):
        thresholds.setdefault(p, meta.default_threshold)

    try:
        engine = OnnxEngine(staging)
    except EngineError as exc:  # fp16 graphs may lack CPU kernels; they are then checked on a GPU (docs)
        if target != "cuda-fp16":
            raise
        reason = f"does not run on the CPU execution provider here ({exc}); verify on a GPU (docs/EXPORT.md)"
        return Evaluation(thresholds=thresholds, metrics={"note": reason}, parity=_skipped(reason, plan.rows_source))
    windows = engine.pair_windows(list(zip(instructions, queries, strict=True)))
    engine_name = "onnxruntime CPUExecutionProvider"
    if target == "cuda-fp16":
        engine_name += " (fp16 kernels on CPU, not the CUDA EP)"
    onnx_scores = score_with_progress(engine, windows, plan.batch_size, f"onnx {target}")

    description = "checkpoint"
    if plan.recalibrate is not None:
        r = plan.recalibrate
        refitted = recalibrate_thresholds(
            policies, labels, onnx_scores, thresholds, r.objective, r.target_fpr, r.min_rows
        )
        description = r.describe(refitted)
    metrics = measure(policies, labels, onnx_scores, thresholds)
    metrics.update(engine=engine_name, thresholds=description, rows_source=plan.rows_source)

    if plan.skip_parity:
        return Evaluation(
            thresholds=thresholds, metrics=metrics, parity=_skipped("--skip-parity (debugging only)", plan.rows_source)
        )
    from training.predict import load_checkpoint

    cache = torch_cache if torch_cache is not None else {}
    if "scores" not in cache:
        log.info("parity gate: scoring %d rows with torch", len(plan.rows))
        torch_scorer, _ = load_checkpoint(plan.checkpoint)
        cache["scores"] = score_with_progress(torch_scorer, windows, plan.batch_size, "torch")
    torch_scores = cache["scores"]
    report = compare(target, policies, queries, labels, torch_scores, onnx_scores, thresholds)
    log.info("%s", report.format())
    check(report)
    parity = report.model_dump(exclude={"worst"})
    parity.update(engine=engine_name, rows_source=plan.rows_source)
    return Evaluation(thresholds=thresholds, metrics=metrics, parity=parity)


def _skipped(reason: str, rows_source: str) -> dict[str, Any]:
    return {"skipped": True, "reason": reason, "rows_source": rows_source}
