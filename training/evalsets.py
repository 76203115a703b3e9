"""Evaluation sets and data reports built from the training corpus.

The corpus decides every label (native rows, benign rows under each policy, scope labels, cross-policy
negatives); an evaluation set is a split of it written as plain JSONL rows (the shared row format), so
``uniguard eval`` scores exactly the labels training used. Policies outside the registry (scope, injection
facets, custom) are written beside the rows as policy YAMLs for ``uniguard eval --policies``.

``uniguard data report`` prints what the default recipe uses: rows per source and label, what the noise
filters dropped and why, and the corpus's examples per policy.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Collection, Sequence
from pathlib import Path

import yaml
from pydantic import BaseModel

from policies.registry import PolicyRegistry
from training.corpus import Corpus, build_corpus, cap_examples, load_paraphrases, load_policies
from training.data import HELDOUT_SOURCES, SEED_DIR, Row, clean_rows, default_data_dir, load_rows
from training.meta import META_FILE


class EvalSet(BaseModel):
    """What ``write_eval_set`` wrote."""

    rows: int
    per_policy: dict[str, dict[str, int]]
    rows_file: Path
    policy_dir: Path


def load_corpus(data: Path | None = None, extra: Sequence[Path] = (), seed_data: bool = True) -> Corpus:
    paths: list[Path] = [data or default_data_dir(), *([SEED_DIR] if seed_data else []), *extra]
    rows, _ = clean_rows(load_rows(paths))
    return build_corpus(rows, load_policies(), load_paraphrases())


def write_eval_set(
    corpus: Corpus,
    splits: Sequence[str],
    out: Path,
    policies: Sequence[str] | None = None,
    cap: int | None = None,
    seed: int = 0,
    exclude_sources: Collection[str] = (),
) -> EvalSet:
    """The corpus examples of ``splits`` (optionally only ``policies``; at most ``cap`` per (policy, source,
    label)) as ``out/rows.jsonl``, and the non-registry policies they use as ``out/policies/*.yaml``.
    ``exclude_sources``: drop every row of these sources (e.g. :func:`trained_sources` of the models compared, so
    the set holds only sources none of them trained on)."""
    wanted = set(policies) if policies else None
    examples = [
        e
        for e in corpus.examples
        if e.split in splits and (wanted is None or e.policy in wanted) and e.source not in exclude_sources
    ]
    if cap:
        examples = cap_examples(examples, cap, seed)
    out.mkdir(parents=True, exist_ok=True)
    policy_dir = out / "policies"
    policy_dir.mkdir(exist_ok=True)
    registry = PolicyRegistry.load()
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    rows_file = out / "rows.jsonl"
    with rows_file.open("w", encoding="utf-8") as handle:
        for e in examples:
            row = {
                "text": e.text,
                "label": "unsafe" if e.label else "safe",
                "policy": e.policy,
                "source": e.source,
                "license": e.license,
                "category": e.kind,
            }
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            counts[e.policy][row["label"]] += 1
    for name in sorted(counts):
        if name not in registry:
            policy = corpus.policies[name]
            data = policy.model_dump(mode="json", exclude_defaults=True)
            (policy_dir / f"{name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return EvalSet(
        rows=len(examples),
        per_policy={p: dict(c) for p, c in sorted(counts.items())},
        rows_file=rows_file,
        policy_dir=policy_dir,
    )


def data_report(data: Path | None = None, extra: Sequence[Path] = ()) -> str:
    """A Markdown report: rows per source and label with their role, noise dropped, examples per policy."""
    paths: list[Path] = [data or default_data_dir(), SEED_DIR, *extra]
    raw = load_rows(paths)
    rows, dropped = clean_rows(raw)
    corpus = build_corpus(rows, load_policies(), load_paraphrases())
    by_source: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for r in raw:
        by_source[(r.policy, r.source)]["read"] += 1
    for r in rows:
        by_source[(r.policy, r.source)][r.label] += 1
    trained_by_source: Counter[str] = Counter(e.source for e in corpus.examples if e.split == "train")
    lines = [
        "| file (policy/source) | rows read | kept safe | kept unsafe | dropped | role | training examples |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for (policy, source), c in sorted(by_source.items()):
        role = "source-held-out (never trained)" if source in HELDOUT_SOURCES else "training + in-source val/test"
        kept = c["safe"] + c["unsafe"]
        lines.append(
            f"| {policy}/{source} | {c['read']} | {c['safe']} | {c['unsafe']} | {c['read'] - kept} | {role} | "
            f"{trained_by_source[source]} |"
        )
    lines += ["", "Dropped as label noise or duplicates:", ""]
    lines += [f"- {reason}: {n}" for reason, n in dropped.most_common()]
    lines += [f"- corpus: {reason}: {n}" for reason, n in corpus.stats.get("_dropped", Counter()).most_common() if n]
    lines += [
        "",
        "| policy | family | train safe | train unsafe | val | test | sho_val | sho_test |",
        "|---|---|" + "---:|" * 6,
    ]
    per: dict[str, Counter[str]] = defaultdict(Counter)
    for e in corpus.examples:
        key = f"train:{e.label}" if e.split == "train" else e.split
        per[e.policy][key] += 1
    for name in sorted(per):
        c = per[name]
        held = " (held out)" if name in corpus.holdout else ""
        lines.append(
            f"| {name}{held} | {corpus.families.get(name, '')} | {c['train:0']} | {c['train:1']} | {c['val']} | "
            f"{c['test']} | {c['sho_val']} | {c['sho_test']} |"
        )
    return "\n".join(lines)


def trained_sources(model: Path) -> set[str]:
    """The public sources a model trained on: ``data_sources`` of an exported folder's ``manifest.json`` or of a
    checkpoint's ``uniguard_meta.json`` (``manifest.json`` is export's ``MANIFEST_FILE``, read as plain JSON here:
    training does not import the later stages)."""
    for name in ("manifest.json", META_FILE):
        path = Path(model) / name
        if path.is_file():
            return {ds["source"] for ds in json.loads(path.read_text(encoding="utf-8")).get("data_sources", [])}
    raise FileNotFoundError(f"{model}: neither manifest.json nor {META_FILE} (pass an exported model or a checkpoint)")


def rows_of(examples_file: Path) -> list[Row]:
    return load_rows([examples_file])


def summarise_eval(report: dict[str, dict], heldout: dict[str, dict] | None = None) -> str:
    """A Markdown table from ``uniguard eval --json`` output of a source-held-out set: per policy F1, precision,
    recall, FPR, and the false-positive rates on the held-out everyday and trigger-word benign sources
    (``heldout``: the same for the hand-written held-out set, used for policies without held-out sources)."""
    from training.data import EVERYDAY_BENIGN_SOURCES, TRIGGER_WORD_SOURCES

    def fpr(policy_report: dict, sources: frozenset[str]) -> str:
        accs = [  # the safe rows of those sources (a trigger-word source may hold a few unsafe rows too)
            acc
            for key, acc in policy_report.get("by_source", {}).items()
            if key.split(":")[0] in sources and key.endswith(":safe")
        ]
        return f"{1 - sum(accs) / len(accs):.3f}" if accs else "-"

    lines = [
        "| policy | rows | F1 | precision | recall | FPR | FPR everyday benign | FPR trigger-word benign |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    f1s = []
    for name, r in sorted(report.items()):
        if name.startswith("_"):
            continue
        source_note = ""
        metrics = r
        if r.get("positives", 1) == 0 and heldout and name in heldout:
            metrics, source_note = heldout[name], " (F1: hand-written held-out set)"
        f1s.append(metrics["f1"])
        lines.append(
            f"| {name}{source_note} | {metrics['support']} | {metrics['f1']:.3f} | {metrics['precision']:.3f} | "
            f"{metrics['recall']:.3f} | {metrics['fpr']:.3f} | {fpr(r, EVERYDAY_BENIGN_SOURCES)} | "
            f"{fpr(r, TRIGGER_WORD_SOURCES)} |"
        )
    if f1s:
        lines.append(f"| macro | | {sum(f1s) / len(f1s):.3f} | | | | | |")
    return "\n".join(lines)
