"""``uniguard train`` (taskguard, multitask)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from training.train import TrainConfig


def _common(p: argparse.ArgumentParser, out: str, minutes: float, epochs: int) -> None:
    p.add_argument("--base", type=Path, help="Hugging Face folder or named encoder: minilm (default), e5-small, mpnet")
    p.add_argument("--data", type=Path, help="shared JSONL data folder (default: $UNIGUARD_DATA_DIR or ../shared/data)")
    p.add_argument("--extra-data", type=Path, nargs="*", default=[], help="more JSONL files or folders")
    p.add_argument("--policies", type=Path, nargs="*", default=[], dest="policy_dirs", help="extra policy folders")
    p.add_argument("--out", type=Path, default=Path(out), help=f"checkpoint folder (default {out})")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--examples-per-epoch", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--max-minutes", type=float, default=minutes, help="time budget including calibration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=None, help="steps between early-stopping evaluations")
    p.add_argument("--mlm-weight", type=float, default=None, help="λ_mlm (0 disables MLM)")
    p.add_argument("--adv-weight", type=float, default=None, help="λ_adv for ALICE++ (0 disables it)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (faster only on CPUs with AMX)")
    p.add_argument(
        "--mode",
        choices=("prefix", "full"),
        default="prefix",
        help="prefix: each policy text is encoded once and only the prompt reads it (fast; the default); "
        "full: every token attends to every token (the 0.2.0 model's recipe)",
    )
    p.add_argument("--policies-per-batch", type=int, default=None, help="prefix mode: policy texts per batch")
    p.add_argument(
        "--mine-top",
        type=int,
        default=None,
        help="hard negatives: the highest-scoring safe training rows per default policy and mining pool (everyday, "
        "hard) added to each epoch after the first (0: off)",
    )


def register(sub: Any) -> None:
    train = sub.add_parser("train", help="train TaskGuard or MultiTaskGuard models", description="Train guard models.")
    tsub = train.add_subparsers(dest="train_kind", metavar="KIND")
    task = tsub.add_parser("taskguard", help="fine-tune a base encoder on one policy")
    task.add_argument("--policy", required=True, help="policy name (default, derived or custom)")
    _common(task, "runs/taskguard", 15.0, 3)
    task.set_defaults(func=run_train, kind="taskguard", holdout=[])
    multi = tsub.add_parser("multitask", help="train one model on dozens of policies (CE + MLM + ALICE++)")
    multi.add_argument("--holdout", nargs="*", default=None, help="policies kept out of training (zero-shot)")
    multi.add_argument(
        "--train-heldout",
        nargs="*",
        default=None,
        metavar="SOURCE",
        help="a final fit: held-out sources (training/data.py HELDOUT_SOURCES) to train on; the rest stay held out "
        "for selection and calibration",
    )
    multi.add_argument(
        "--heldout-everyday-floor",
        action="store_true",
        help="the everyday false-positive floor also holds on the held-out everyday sources alone (docs/TRAINING.md)",
    )
    _common(multi, "runs/multitask", 25.0, 2)
    multi.set_defaults(func=run_train, kind="multitask", policy=None)
    cal = tsub.add_parser(
        "calibrate",
        help="fit a checkpoint's thresholds again with today's calibration rule (weights untouched)",
        description="Rebuild the checkpoint's evaluation sets from its recorded recipe and fit its thresholds on "
        "the rows it never trained on, under the benign false-positive floors (docs/TRAINING.md).",
    )
    cal.add_argument("--model", type=Path, required=True, help="checkpoint folder (rewrites its uniguard_meta.json)")
    cal.add_argument("--data", type=Path, default=None, help="shared data folder (default: the recipe's)")
    cal.add_argument(
        "--recipe-from",
        type=Path,
        default=None,
        help="a trained checkpoint whose recipe rebuilds the evaluation sets (for a merged checkpoint)",
    )
    cal.set_defaults(func=run_calibrate)
    train.set_defaults(func=lambda a: train.print_help() or 2)
    from training.encoders_cli import register as register_encoders

    register_encoders(sub)  # encoders

    data = sub.add_parser("data", help="data reports and evaluation sets", description="Inspect the training data.")
    dsub = data.add_subparsers(dest="data_kind", metavar="KIND")
    rep = dsub.add_parser("report", help="rows per source and label, noise dropped, examples per policy (Markdown)")
    rep.add_argument(
        "--data", type=Path, help="shared JSONL data folder (default: $UNIGUARD_DATA_DIR or ../shared/data)"
    )
    rep.add_argument("--extra-data", type=Path, nargs="*", default=[])
    rep.set_defaults(func=run_data_report)
    rows = dsub.add_parser(
        "evalset",
        help="write a split of the training corpus as JSONL rows + policy YAMLs for `uniguard eval`",
        description="The corpus decides the labels (benign rows under every policy, scope labels...); "
        "sho_val/sho_test are the source-held-out halves.",
    )
    rows.add_argument(
        "--split", nargs="+", default=["sho_test"], choices=["train", "val", "test", "sho_val", "sho_test"]
    )
    rows.add_argument("--policies", nargs="*", default=None, help="only these policies (default: all)")
    rows.add_argument("--cap", type=int, default=None, help="max rows per (policy, source, label)")
    rows.add_argument("--data", type=Path, help="shared JSONL data folder")
    rows.add_argument("--out", type=Path, required=True, help="folder for rows.jsonl and policies/")
    rows.add_argument(
        "--exclude-sources-of",
        type=Path,
        nargs="+",
        default=[],
        metavar="MODEL",
        help="drop the rows of every source these models (exported folders or checkpoints) trained on, so a "
        "comparison reads only sources none of them saw",
    )
    rows.set_defaults(func=run_data_evalset)
    summ = dsub.add_parser("summary", help="Markdown table of a source-held-out `uniguard eval --json` report")
    summ.add_argument("report", type=Path, help="eval JSON of a sho split (uniguard data evalset + uniguard eval)")
    summ.add_argument("--heldout", type=Path, help="eval JSON of the hand-written held-out set (F1 where no source)")
    summ.set_defaults(func=run_data_summary)
    data.set_defaults(func=lambda a: data.print_help() or 2)


def run_data_summary(args: argparse.Namespace) -> int:
    import json

    from training.evalsets import summarise_eval

    report = json.loads(args.report.read_text(encoding="utf-8"))
    heldout = json.loads(args.heldout.read_text(encoding="utf-8")) if args.heldout else None
    print(summarise_eval(report, heldout))
    return 0


def run_data_report(args: argparse.Namespace) -> int:
    from training.evalsets import data_report

    print(data_report(args.data, args.extra_data))
    return 0


def run_data_evalset(args: argparse.Namespace) -> int:
    from training.evalsets import load_corpus, trained_sources, write_eval_set

    excluded = set().union(*(trained_sources(m) for m in args.exclude_sources_of))
    if excluded:
        print(f"leaving out {len(excluded)} sources the models trained on: {', '.join(sorted(excluded))}")
    result = write_eval_set(
        load_corpus(args.data), args.split, args.out, args.policies, args.cap, exclude_sources=excluded
    )
    for name, counts in result.per_policy.items():
        print(f"{name:<28} safe {counts.get('safe', 0):>6}  unsafe {counts.get('unsafe', 0):>6}")
    print(f"wrote {result.rows} rows to {result.rows_file} (policies outside the registry: {result.policy_dir})")
    return 0


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The training recipe that ``uniguard train taskguard|multitask`` arguments ask for."""
    from training.train import TrainConfig

    values: dict[str, Any] = {
        "kind": args.kind,
        "policy": args.policy,
        "base": args.base,
        "data": args.data,
        "extra_data": args.extra_data,
        "policy_dirs": args.policy_dirs,
        "out": args.out,
        "epochs": args.epochs,
        "max_minutes": args.max_minutes,
        "seed": args.seed,
        "threads": args.threads,
        "bf16": args.bf16,
        "mode": args.mode,
    }
    if args.kind == "taskguard" and args.out == Path("runs/taskguard"):
        values["out"] = Path(f"runs/taskguard-{args.policy}")
    if args.kind == "taskguard":
        values.update(adv_weight=0.0, mlm_weight=0.0, holdout=[])
    if args.kind == "multitask" and args.holdout is not None:
        values["holdout"] = args.holdout
    if args.kind == "multitask" and args.train_heldout:
        values["train_heldout"] = args.train_heldout
    if args.kind == "multitask" and args.heldout_everyday_floor:
        values["heldout_everyday_floor"] = True
    for key in (
        "examples_per_epoch",
        "batch_size",
        "lr",
        "eval_every",
        "mlm_weight",
        "adv_weight",
        "policies_per_batch",
        "mine_top",
    ):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    return TrainConfig(**values)


def run_train(args: argparse.Namespace) -> int:
    from training.data import DataError
    from training.train import train

    cfg = train_config(args)
    try:
        meta = train(cfg)
    except DataError as exc:
        raise SystemExit(f"uniguard train: {exc}") from exc
    m = meta.metrics
    zero_shot = f"zero-shot macro-F1 {m['zero_shot_macro_f1']:.4f}; " if m.get("zero_shot") else ""
    print(f"val macro-F1 {m['val_macro_f1']:.4f}; {zero_shot}{m['train_minutes']} min -> {cfg.out}")
    return 0


def run_calibrate(args: Any) -> int:
    from training.data import DataError
    from training.train import recalibrate

    try:
        meta = recalibrate(args.model, args.data, args.recipe_from)
    except (DataError, FileNotFoundError) as exc:
        raise SystemExit(f"uniguard train calibrate: {exc}") from exc
    before = meta.metrics["recalibrated"]["previous_thresholds"]
    for name in sorted(meta.thresholds):
        old, new = before.get(name), meta.thresholds[name]
        if old is None or abs(old - new) > 1e-9:
            where = meta.metrics["calibrated_on"].get(name, "")
            print(f"{name:28s} {'-' if old is None else f'{old:.3f}'} -> {new:.3f}  ({where})")
    print(f"source-held-out val macro-F1 {meta.metrics['sho_val_macro_f1']:.4f} -> {args.model}")
    return 0
