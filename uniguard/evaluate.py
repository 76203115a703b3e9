"""``uniguard eval``: per-policy metrics of a checkpoint or an exported model.

Rows (shared JSONL format) route by their ``policy`` field to the policy text: policies from
``--policies`` folders, then the default registry and the project's custom policies, then the
policies recorded in the model (derived policies it was trained on). Thresholds come from the
model: per-policy calibrated values, the model's ``default_threshold`` for policies it never saw.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, Field

from training.data import SPLIT_CHOICES
from training.meta import META_FILE
from training.metrics import BinaryMetrics

MANIFEST_NAME = "manifest.json"


class PolicyReport(BinaryMetrics):
    """The metrics of one policy (unsafe is the positive class) plus accuracy per source and label."""

    by_source: dict[str, float] = Field(default_factory=dict)


class Scorer(Protocol):
    def score_pairs(self, pairs: list[tuple[str, str]], batch_size: int = 32) -> Sequence[Any]: ...


class LoadedModel(BaseModel):
    model_config = {"arbitrary_types_allowed": True}

    kind: str
    scorer: Any
    policy_texts: dict[str, str]
    thresholds: dict[str, float]
    default_threshold: float


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
    ev.add_argument("--split", choices=SPLIT_CHOICES, default="all", help="row split (sho*: held-out sources)")
    ev.add_argument("--seed", type=int, default=0, help="split seed (must match training)")
    ev.add_argument("--cap", type=int, default=None, help="max rows per (policy, source, label); default 150 if split")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--threads", type=int, default=2)
    ev.set_defaults(func=run_eval)


def load_model(folder: Path, threads: int | None = 2) -> LoadedModel:
    """A scorer plus the policy texts and thresholds the model records."""
    folder = Path(folder)
    if (folder / MANIFEST_NAME).is_file():
        from export.manifest import Manifest
        from service.engine import OnnxEngine

        manifest = Manifest.load(folder)
        return LoadedModel(
            kind="onnx",
            scorer=OnnxEngine(folder, threads=threads),
            policy_texts={p.name: p.instruction_text for p in manifest.policies},
            thresholds=dict(manifest.thresholds),
            default_threshold=manifest.default_threshold,
        )
    if (folder / META_FILE).is_file():
        from training.predict import TorchScorer

        scorer = TorchScorer.load(folder, threads=threads)
        meta = scorer.meta
        assert meta is not None
        return LoadedModel(
            kind=meta.kind,
            scorer=scorer,
            policy_texts={p.name: p.instruction_text for p in meta.policies},
            thresholds=dict(meta.thresholds),
            default_threshold=meta.default_threshold,
        )
    raise SystemExit(
        f"uniguard eval: {folder} is neither a training checkpoint ({META_FILE}) nor an exported model "
        f"({MANIFEST_NAME}); pass --model DIR of one of them"
    )


def policy_texts(model: LoadedModel, folders: Sequence[Path]) -> dict[str, str]:
    """Name -> instruction text; --policies folders win, then the registry, then the model's own."""
    from policies.registry import PolicyRegistry
    from training.data import CUSTOM_POLICY_DIR

    texts = dict(model.policy_texts)
    project = [CUSTOM_POLICY_DIR] if CUSTOM_POLICY_DIR.is_dir() and any(CUSTOM_POLICY_DIR.glob("*.y*ml")) else []
    for policy in PolicyRegistry.load(project):
        texts[policy.name] = policy.instruction_text()
    if folders:
        for policy in PolicyRegistry.load(folders, include_default=False):
            texts[policy.name] = policy.instruction_text()
    return texts


def evaluate_rows(
    model: LoadedModel, rows: Sequence[Any], texts: dict[str, str], batch_size: int = 32
) -> tuple[dict[str, PolicyReport], dict[str, tuple[list[float], list[int]]]]:
    """Score every row under its policy and compute the per-policy report."""
    import numpy as np

    from training.metrics import binary_metrics, macro

    unknown = sorted({r.policy for r in rows} - set(texts))
    if unknown:
        raise SystemExit(
            f"uniguard eval: rows name policies the model and registry do not know: {', '.join(unknown)}; "
            "pass their YAML folder with --policies DIR"
        )
    pairs = [(texts[r.policy], r.text) for r in rows]
    scores = [s.score for s in model.scorer.score_pairs(pairs, batch_size=batch_size)]
    reports: dict[str, PolicyReport] = {}
    curves: dict[str, tuple[list[float], list[int]]] = {}
    for policy in sorted({r.policy for r in rows}):
        idx = [i for i, r in enumerate(rows) if r.policy == policy]
        s = np.array([scores[i] for i in idx])
        y = np.array([rows[i].y for i in idx])
        threshold = model.thresholds.get(policy, model.default_threshold)
        m = binary_metrics(s, y, threshold)
        by_source: dict[str, list[bool]] = {}
        for i in idx:
            key = f"{rows[i].source}:{rows[i].label}"
            by_source.setdefault(key, []).append(int(scores[i] >= threshold) == rows[i].y)
        acc = {k: sum(v) / len(v) for k, v in sorted(by_source.items())}
        reports[policy] = PolicyReport(**m.model_dump(), by_source=acc | {"_macro": macro(list(acc.values()))})
        curves[policy] = (list(s), list(y))
    return reports, curves


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


def print_table(reports: dict[str, PolicyReport], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("policy", "precision", "recall", "F1", "FPR", "AUROC", "support", "unsafe", "threshold"):
        table.add_column(col, justify="left" if col == "policy" else "right")

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    for name, r in reports.items():
        table.add_row(
            name,
            fmt(r.precision),
            fmt(r.recall),
            fmt(r.f1),
            fmt(r.fpr),
            fmt(r.auroc),
            str(r.support),
            str(r.positives),
            f"{r.threshold:.3f}",
        )
    m = macro_report(reports)
    table.add_row(
        "macro", fmt(m["precision"]), fmt(m["recall"]), fmt(m["f1"]), fmt(m["fpr"]), fmt(m["auroc"]),
        str(m["support"]), "", "", style="bold",
    )  # fmt: skip
    console = Console()
    Console(width=max(console.width, 120)).print(table)


def plot_pr(curves: dict[str, tuple[list[float], list[int]]], path: Path) -> None:
    """Precision-recall curves per policy, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 5))
    for policy, (scores, labels) in curves.items():
        s, y = np.asarray(scores), np.asarray(labels)
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


def select_rows(rows: Sequence[Any], split: str, seed: int, cap: int | None) -> list[Any]:
    from training.data import cap_per_stratum, in_split

    if split != "all":
        rows = [r for r in rows if in_split(r, split, seed)]
        cap = 150 if cap is None else cap
    return cap_per_stratum(rows, cap, seed) if cap else list(rows)


def run_eval(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see training/train.py
    from training.data import DataError, clean_rows, load_rows

    try:
        rows, dropped = clean_rows(load_rows(args.data))
    except DataError as exc:
        raise SystemExit(f"uniguard eval: {exc}") from exc
    rows = select_rows(rows, args.split, args.seed, args.cap)
    if not rows:
        raise SystemExit(f"uniguard eval: no rows in {', '.join(map(str, args.data))} (split {args.split})")
    model = load_model(args.model, args.threads)
    texts = policy_texts(model, args.policies)
    reports, curves = evaluate_rows(model, rows, texts, args.batch_size)
    print_table(
        reports, f"{args.model} on {len(rows)} rows (split {args.split}; {sum(dropped.values())} noisy dropped)"
    )
    if args.json:
        payload: dict[str, Any] = {name: r.model_dump() for name, r in reports.items()}
        payload["_macro"] = macro_report(reports)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")
        png = args.json.with_suffix(".pr.png")
        plot_pr(curves, png)
        print(f"wrote {args.json} and {png}")
    return 0
