"""Per-category precision, recall and F1 of a model on held-out rows of the moderation categories.

The rows are the ones the training corpus labels under each category policy (``training/corpus.py``: unsafe rows
of the sources' harm categories mapped by CATEGORY_MAP, safe rows of the same family and unsafe rows of unrelated
harm areas as negatives, cross-family negatives), restricted to the test split (the split training never sees) and
capped per (category, source, label) like ``uniguard eval --split test``. Each category is scored with the
registry's text (what the service reads) and the threshold the service would apply: the model's calibrated one
only if it was calibrated on that exact text, else the model's default.

    python scripts/eval_categories.py --model models/uniguard-minilm --json runs/categories-test.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="exported model folder or training checkpoint")
    parser.add_argument("--data", type=Path, default=None, help="shared data folder (default: ../shared/data)")
    parser.add_argument("--split", choices=["test", "val"], default="test")
    parser.add_argument("--split-seed", type=int, default=0, help="must match training's split_seed")
    parser.add_argument("--cap", type=int, default=150, help="max rows per (category, source, label)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the metrics here as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from policies.registry import CATEGORY_GROUP, PolicyRegistry
    from training.corpus import DEFAULT_HOLDOUT, build_corpus, cap_examples, load_policies
    from training.data import Row, load_all
    from uniguard.evaluate import evaluate_rows, load_model, macro_report, print_table

    registry = PolicyRegistry.load()
    names = [p.name for p in registry.group(CATEGORY_GROUP)]
    corpus = build_corpus(load_all(args.data), load_policies(), {}, holdout=DEFAULT_HOLDOUT, split_seed=args.split_seed)
    examples = cap_examples(corpus.select(args.split, names), args.cap, seed=0)
    rows = [Row(text=e.text, label="unsafe" if e.label else "safe", policy=e.policy, source=e.group) for e in examples]
    missing = sorted(set(names) - {r.policy for r in rows})
    model = load_model(args.model, args.threads)
    texts = {p.name: p.instruction_text() for p in registry}
    # the service's threshold: calibrated only for the exact text the model was calibrated on
    model.thresholds = {
        name: model.thresholds.get(name, model.default_threshold)
        if model.policy_texts.get(name) == texts[name]
        else (registry[name].threshold if "threshold" in registry[name].model_fields_set else model.default_threshold)
        for name in names
    }
    reports, _ = evaluate_rows(model, rows, texts)
    held = [n for n in names if n in corpus.holdout]
    print_table(reports, f"{args.model}: moderation categories on the {args.split} split ({len(rows)} rows)")
    known = [n for n in names if model.policy_texts.get(n) == texts[n]]
    print(f"held out of training (zero-shot): {', '.join(held) or 'none'}")
    print(f"calibrated on this exact text: {', '.join(known) or 'none'}")
    if missing:
        print(f"no {args.split} rows with both labels: {', '.join(missing)}")
    if args.json:
        payload = {name: r.model_dump() for name, r in reports.items()}
        payload["_macro"] = macro_report(reports)
        payload["_holdout"] = held  # type: ignore[assignment]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
