"""``uniguard eval``: per-policy metrics of a checkpoint or an exported model.

Rows (shared JSONL format) route by their ``policy`` field to the policy text: policies from
``--policies`` folders, then the default registry and the project's custom policies, then the
policies recorded in the model (derived policies it was trained on). Thresholds follow the
service's one rule (``policies.thresholds``): a calibrated value only for the exact policy text the model was
calibrated on, then the policy file's own threshold, then the model's ``default_threshold``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from training.data import SPLIT_CHOICES
from training.meta import META_FILE
from training.metrics import BinaryMetrics

MANIFEST_NAME = "manifest.json"


class PolicyReport(BinaryMetrics):
    """The metrics of one policy (unsafe is the positive class) plus accuracy per source and label."""

    by_source: dict[str, float] = Field(default_factory=dict)


class LoadedModel(BaseModel):
    model_config = {"arbitrary_types_allowed": True}

    kind: str
    scorer: Any  # scoring.core.Scorer: the service's ONNX engine or the torch backend
    record: Any  # the manifest or checkpoint meta: its policies, thresholds and default (policies.thresholds)


class ResolvedPolicy(BaseModel):
    """A policy as the service would apply it to this model: its instruction text and its threshold."""

    text: str
    threshold: float


def register(sub: Any) -> None:
    ev = sub.add_parser(
        "eval",
        help="evaluate a model on JSONL data",
        description="Per-policy precision, recall, F1, FPR and AUROC of a checkpoint or an exported model folder.",
    )
    ev.add_argument("--model", type=Path, required=True, help="checkpoint folder (uniguard_meta.json) or ONNX export")
    ev.add_argument("--data", type=Path, nargs="+", required=True, help="JSONL files or folders (shared row format)")
    ev.add_argument("--policies", type=Path, nargs="*", default=[], help="folders of extra policy YAMLs")
    ev.add_argument("--json", type=Path, help="write metrics as JSON here (plus a PR-curve PNG beside it)")
    ev.add_argument("--scores", type=Path, help="write every row's score as JSONL here (policy, text, label, score)")
    ev.add_argument("--split", choices=SPLIT_CHOICES, default="all", help="row split (sho*: held-out sources)")
    ev.add_argument("--seed", type=int, default=0, help="split seed (must match training)")
    ev.add_argument("--cap", type=int, default=None, help="max rows per (policy, source, label); default 150 if split")
    ev.add_argument(
        "--flagged",
        nargs="+",
        metavar="POLICY",
        help="judge each row as /classify's `flagged` over these policies (unsafe if any of them is), as "
        "moderation and injection benchmarks are judged; the rows' own policy field is ignored",
    )
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--threads", type=int, default=2)
    ev.set_defaults(func=run_eval)


def load_model(folder: Path, threads: int | None = 2) -> LoadedModel:
    """A scorer plus the policy texts and thresholds the model records."""
    folder = Path(folder)
    if (folder / MANIFEST_NAME).is_file():
        from scoring.onnx import OnnxEngine

        engine = OnnxEngine(folder, threads=threads)  # what the service runs
        return LoadedModel(kind="onnx", scorer=engine, record=engine.manifest)
    if (folder / META_FILE).is_file():
        from training.predict import load_checkpoint  # torch: the training extras

        scorer, meta = load_checkpoint(folder, threads=threads)
        return LoadedModel(kind=meta.kind, scorer=scorer, record=meta)
    raise SystemExit(
        f"uniguard eval: {folder} is neither a training checkpoint ({META_FILE}) nor an exported model "
        f"({MANIFEST_NAME}); pass --model DIR of one of them"
    )


def resolve_policies(model: LoadedModel, folders: Sequence[Path]) -> dict[str, ResolvedPolicy]:
    """Name -> text and threshold; --policies folders win, then the registry (and the project's custom policies),
    then the policies the model records. Thresholds follow the service's one rule (``policies.thresholds``): the
    model's calibrated value only for the exact text it was calibrated on, then the file's own, then the model's
    default."""
    from policies.registry import PolicyRegistry
    from policies.thresholds import policy_threshold
    from training.data import CUSTOM_POLICY_DIR

    record = model.record
    out = {
        ref.name: ResolvedPolicy(
            text=ref.instruction_text, threshold=record.thresholds.get(ref.name, record.default_threshold)
        )
        for ref in record.policies
    }
    project = [CUSTOM_POLICY_DIR] if CUSTOM_POLICY_DIR.is_dir() and any(CUSTOM_POLICY_DIR.glob("*.y*ml")) else []
    policies = list(PolicyRegistry.load(project))
    if folders:
        policies += list(PolicyRegistry.load(folders, include_default=False))
    for policy in policies:
        out[policy.name] = ResolvedPolicy(text=policy.instruction_text(), threshold=policy_threshold(policy, record))
    return out


def evaluate_rows(
    model: LoadedModel, rows: Sequence[Any], policies: dict[str, ResolvedPolicy], batch_size: int = 32
) -> tuple[dict[str, PolicyReport], list[float]]:
    """Score every row under its policy; the per-policy report and each row's score."""
    import numpy as np

    from training.metrics import binary_metrics, macro

    unknown = sorted({r.policy for r in rows} - set(policies))
    if unknown:
        raise SystemExit(
            f"uniguard eval: rows name policies the model and registry do not know: {', '.join(unknown)}; "
            "pass their YAML folder with --policies DIR"
        )
    pairs = [(policies[r.policy].text, r.text) for r in rows]
    scores = [s.score for s in model.scorer.score_pairs(pairs, batch_size=batch_size)]
    reports: dict[str, PolicyReport] = {}
    for policy in sorted({r.policy for r in rows}):
        idx = [i for i, r in enumerate(rows) if r.policy == policy]
        s = np.array([scores[i] for i in idx])
        y = np.array([rows[i].y for i in idx])
        threshold = policies[policy].threshold
        m = binary_metrics(s, y, threshold)
        by_source: dict[str, list[bool]] = {}
        for i in idx:
            key = f"{rows[i].source}:{rows[i].label}"
            by_source.setdefault(key, []).append(int(scores[i] >= threshold) == rows[i].y)
        acc = {k: sum(v) / len(v) for k, v in sorted(by_source.items())}
        reports[policy] = PolicyReport(**m.model_dump(), by_source=acc | {"_macro": macro(list(acc.values()))})
    return reports, scores


def evaluate_flagged(
    model: LoadedModel, rows: Sequence[Any], policies: dict[str, ResolvedPolicy], names: Sequence[str], batch_size: int
) -> tuple[PolicyReport, list[float]]:
    """/classify's ``flagged`` over ``names`` against each row's label: one report whose score is the largest margin
    ``score - threshold`` over the policies (flagged when >= 0), so AUROC ranks rows as the verdict does."""
    import numpy as np

    from training.metrics import binary_metrics, macro

    unknown = sorted(set(names) - set(policies))
    if unknown:
        raise SystemExit(f"uniguard eval: --flagged names unknown policies: {', '.join(unknown)}")
    pairs = [(policies[n].text, r.text) for r in rows for n in names]
    raw = np.array([s.score for s in model.scorer.score_pairs(pairs, batch_size=batch_size)])
    margins = (raw.reshape(len(rows), len(names)) - np.array([policies[n].threshold for n in names])).max(axis=1)
    y = np.array([r.y for r in rows])
    m = binary_metrics(margins, y, 0.0)
    by_source: dict[str, list[bool]] = {}
    for row, margin in zip(rows, margins, strict=True):
        by_source.setdefault(f"{row.source}:{row.label}", []).append(int(margin >= 0.0) == row.y)
    acc = {k: sum(v) / len(v) for k, v in sorted(by_source.items())}
    return PolicyReport(**m.model_dump(), by_source=acc | {"_macro": macro(list(acc.values()))}), margins.tolist()


def macro_report(reports: dict[str, PolicyReport]) -> dict[str, Any]:
    from training.metrics import macro

    aurocs = [r.auroc for r in reports.values() if r.auroc is not None]
    return {
        "precision": macro([r.precision for r in reports.values()]),
        "recall": macro([r.recall for r in reports.values()]),
        "f1": macro([r.f1 for r in reports.values()]),
        "fpr": macro([r.fpr for r in reports.values()]),
        "auroc": macro(aurocs) if aurocs else None,
        "support": sum(r.support for r in reports.values()),
    }


def print_report(reports: dict[str, PolicyReport], title: str) -> None:
    from uniguard.console import print_table

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    rows = []
    for name, r in reports.items():
        values = (r.precision, r.recall, r.f1, r.fpr, r.auroc)
        rows.append([name, *map(fmt, values), str(r.support), str(r.positives), f"{r.threshold:.3f}"])
    m = macro_report(reports)
    rows.append(
        ["macro", *(fmt(m[k]) for k in ("precision", "recall", "f1", "fpr", "auroc")), str(m["support"]), "", ""]
    )
    headers = ("policy", "precision", "recall", "F1", "FPR", "AUROC", "support", "unsafe", "threshold")
    print_table(title, headers, rows, bold_last=True)


def plot_pr(rows: Sequence[Any], scores: Sequence[float], path: Path) -> bool:
    """Precision-recall curves per policy, one PNG; False (nothing written) without matplotlib."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 5))
    for policy in sorted({r.policy for r in rows}):
        idx = [i for i, r in enumerate(rows) if r.policy == policy]
        s, y = np.asarray([scores[i] for i in idx]), np.asarray([rows[i].y for i in idx])
        if y.sum() == 0 or y.sum() == y.size:
            continue
        order = np.argsort(-s, kind="mergesort")
        tp = np.cumsum(y[order])
        precision = tp / np.arange(1, y.size + 1)
        recall = tp / y.sum()
        ax.plot(recall, precision, label=policy)
    ax.set_xlabel("recall (unsafe)")
    ax.set_ylabel("precision (unsafe)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title("Precision-recall per policy")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def select_rows(rows: Sequence[Any], split: str, seed: int, cap: int | None) -> list[Any]:
    from training.data import cap_per_stratum, in_split

    if split != "all":
        rows = [r for r in rows if in_split(r, split, seed)]
        cap = 150 if cap is None else cap
    return cap_per_stratum(rows, cap, seed) if cap else list(rows)


def run_eval(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see training/train.py
    from training.corpus import BENIGN_POLICY
    from training.data import DataError, clean_rows, load_rows

    try:
        rows, dropped = clean_rows(load_rows(args.data))
    except DataError as exc:
        raise SystemExit(f"uniguard eval: {exc}") from exc
    # `benign` rows are safe under every policy and name none of their own: `uniguard data evalset` spreads them;
    # --flagged ignores the rows' policy, so there they are what they are: safe prompts.
    if not args.flagged:
        rows = [r for r in rows if r.policy != BENIGN_POLICY]
    rows = select_rows(rows, args.split, args.seed, args.cap)
    if not rows:
        raise SystemExit(f"uniguard eval: no rows in {', '.join(map(str, args.data))} (split {args.split})")
    model = load_model(args.model, args.threads)
    policies = resolve_policies(model, args.policies)
    if args.flagged:
        report, scores = evaluate_flagged(model, rows, policies, args.flagged, args.batch_size)
        reports = {"flagged(" + "+".join(args.flagged) + ")": report}
        rows = [r.model_copy(update={"policy": next(iter(reports))}) for r in rows]  # one curve in the PR plot
    else:
        reports, scores = evaluate_rows(model, rows, policies, args.batch_size)
    print_report(
        reports, f"{args.model} on {len(rows)} rows (split {args.split}; {sum(dropped.values())} noisy dropped)"
    )
    if args.json:
        payload: dict[str, Any] = {name: r.model_dump() for name, r in reports.items()}
        payload["_macro"] = macro_report(reports)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")
        png = args.json.with_suffix(".pr.png")
        if plot_pr(rows, scores, png):
            print(f"wrote {args.json} and {png}")
        else:
            print(f"wrote {args.json} (no PR-curve PNG: matplotlib is in the training extras, `make dev-deps`)")
    if args.scores:
        args.scores.parent.mkdir(parents=True, exist_ok=True)
        with args.scores.open("w", encoding="utf-8") as handle:
            for row, score in zip(rows, scores, strict=True):
                record = {"policy": row.policy, "text": row.text, "label": row.label, "score": score}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(f"wrote {args.scores}")
    return 0
