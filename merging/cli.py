"""``uniguard merge search`` (model merging search) and ``uniguard merge apply`` (one merge)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from training.data import SPLIT_CHOICES

METHOD_NAMES = ("linear", "task_arithmetic", "ties", "dare", "slerp")  # kept in sync with merging.methods (tested)
SUBSET_NAMES = ("all", "attention", "attention_output", "no_head")
STRATEGY_NAMES = ("thompson", "ucb", "egreedy", "random")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--candidates",
        nargs="+",
        type=Path,
        required=True,
        metavar="DIR",
        help="checkpoint folders (Hugging Face folder + uniguard_meta.json)",
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the merged checkpoint")
    p.add_argument(
        "--base",
        type=Path,
        default=None,
        metavar="DIR",
        help="encoder the candidates were fine-tuned from (task vectors); default: all-MiniLM-L6-v2",
    )
    p.add_argument(
        "--anchor",
        type=Path,
        default=None,
        metavar="DIR",
        help="candidate whose parameters fill everything outside the merged subset "
        "(default: search: best on validation; apply: the first candidate)",
    )
    p.add_argument("--name", default=None, help="model name in the meta (default: the --out folder name)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _add_data(p: argparse.ArgumentParser, when_empty: str) -> None:
    p.add_argument(
        "--val",
        nargs="*",
        type=Path,
        default=[],
        metavar="DATA",
        help=f"validation JSONL files/folders (rows text, label, policy); none: {when_empty}",
    )
    p.add_argument(
        "--split",
        default="val",
        choices=SPLIT_CHOICES,
        help="keep only rows the training split function puts in this split (default val, so the whole "
        "data folder can be passed safely; 'all' keeps every row)",
    )
    p.add_argument("--cap-per-source", type=int, default=150, help="max rows per (policy, source, label); 0: no cap")
    p.add_argument(
        "--max-rows-per-policy",
        type=int,
        default=150,
        help="max rows per policy in each of the search and held-out parts (speed); 0: no cap",
    )


def _data(args: argparse.Namespace) -> Any:
    from merging.mms import DataSettings

    return DataSettings(
        val=list(args.val),
        split=args.split,
        cap_per_source=args.cap_per_source or None,
        holdout_fraction=getattr(args, "holdout", 0.0),
        max_rows_per_policy=args.max_rows_per_policy or None,
    )


def _run_search(args: argparse.Namespace) -> int:
    from merging.mms import SearchSettings, run_search

    strategies = list(STRATEGY_NAMES) if args.strategy == "all" else args.strategy.split(",")
    report = run_search(
        SearchSettings(
            candidates=args.candidates,
            out=args.out,
            data=_data(args),
            iterations=args.iterations,
            top_k=args.top_k,
            strategies=strategies,
            methods=args.methods,
            subsets=args.subsets,
            seed=args.seed,
            base=args.base,
            anchor=args.anchor,
            batch_size=args.batch_size,
            threads=args.threads,
            precision=args.precision,
            name=args.name,
            full_report=args.full_report,
        )
    )
    return 0 if report else 1


def _run_apply(args: argparse.Namespace) -> int:
    from merging.methods import MergeParams
    from merging.mms import ApplySettings, apply_merge

    apply_merge(
        ApplySettings(
            candidates=args.candidates,
            out=args.out,
            method=args.method,
            weights=args.weights,
            subset=args.subset,
            params=MergeParams(
                lam=args.lam, density=args.density, drop_rate=args.drop_rate, combine=args.combine, seed=args.seed
            ),
            base=args.base,
            anchor=args.anchor,
            data=_data(args) if args.val else None,
            batch_size=args.batch_size,
            threads=args.threads,
            name=args.name,
        )
    )
    return 0


def register(sub: Any) -> None:
    merge = sub.add_parser(
        "merge",
        help="merge guard models (methods and bandit search)",
        description="Merge guard models: one merge (apply) or the model merging search (search).",
    )
    msub = merge.add_subparsers(dest="merge_command", metavar="SUBCOMMAND")
    merge.set_defaults(func=lambda a: merge.print_help() or 2)

    s = msub.add_parser(
        "search",
        help="model merging search over top-k candidates (Thompson/UCB/ε-greedy/random)",
        description="Select the top-k candidates on validation and search merge weights, method, "
        "hyper-parameters and parameter subset; writes the best merge as a checkpoint "
        "with trials.json, report.json and search.png.",
    )
    _add_common(s)
    _add_data(s, "the shared data and the seed files")
    s.add_argument("--holdout", type=float, default=0.3, help="fraction of the rows held out for the final report")
    s.add_argument("--iterations", type=int, default=50, help="iterations per strategy")
    s.add_argument("--top-k", type=int, default=6)
    s.add_argument(
        "--strategy",
        default="thompson",
        help=f"one of {', '.join(STRATEGY_NAMES)}, a comma list, or 'all' (compare strategies)",
    )
    s.add_argument(
        "--methods",
        nargs="+",
        default=list(METHOD_NAMES),
        choices=METHOD_NAMES,
        help="merge methods to search over (one method: the per-method ablation)",
    )
    s.add_argument("--subsets", nargs="+", default=list(SUBSET_NAMES), choices=SUBSET_NAMES)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--precision",
        default="bf16",
        choices=["bf16", "fp32"],
        help="forward precision of all scoring (bf16 autocast: ~1.6x faster, P(unsafe) within ~1e-4 of fp32)",
    )
    s.add_argument(
        "--full-report",
        action="store_true",
        help="also score every member and each method's default and best merge on the held-out split "
        "(the ablation; costs up to k + 2·methods extra evaluations)",
    )
    s.set_defaults(func=_run_search)

    a = msub.add_parser(
        "apply",
        help="one merge with given weights and method",
        description="Merge candidates with one method and write a UniGuard checkpoint.",
    )
    _add_common(a)
    _add_data(a, "no threshold calibration (thresholds from the anchor)")
    a.add_argument("--method", required=True, choices=METHOD_NAMES)
    a.add_argument("--weights", nargs="+", type=float, default=None, help="one per candidate (default: equal)")
    a.add_argument("--subset", default="all", choices=SUBSET_NAMES)
    a.add_argument("--lam", type=float, default=1.0, help="λ, scale of the merged task vector")
    a.add_argument("--density", type=float, default=0.5, help="TIES: fraction of each task vector kept")
    a.add_argument("--drop-rate", type=float, default=0.5, help="DARE: drop probability p")
    a.add_argument("--combine", default="ties", choices=["linear", "ties"], help="DARE: combination of the δs")
    a.add_argument("--seed", type=int, default=0, help="DARE mask seed")
    a.set_defaults(func=_run_apply)
