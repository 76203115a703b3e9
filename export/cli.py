"""``uniguard export``: a checkpoint folder -> an ONNX model folder with a manifest (see docs/EXPORT.md)."""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from export.manifest import TARGETS
from policies.labels import label_to_id
from training.data import SPLIT_CHOICES

if TYPE_CHECKING:
    from training.meta import CheckpointMeta


def load_val_rows(
    paths: Sequence[Path],
    meta: CheckpointMeta,
    policy_dirs: Sequence[Path] = (),
    max_per_policy: int | None = None,
    seed: int = 0,
    split: str = "val",
) -> list[tuple[str, str, int]]:
    """Read JSONL rows {text, label, policy} and map each policy name to its instruction text.

    Rows are read and cleaned by the training stage's loader; ``split`` keeps only the rows its
    hash split puts there (``val`` by default, so a whole data folder can be passed without
    measuring on training rows; ``all`` keeps every row). The checkpoint's own policies (the exact
    text it was trained with) win; other names come from the registry (default policies plus
    ``policy_dirs``). Rows of the ``benign`` pseudo-policy (safe under every policy: the corpus spreads them,
    ``uniguard data evalset`` writes them out per policy) are skipped. With ``max_per_policy``, a seeded random
    sample of that many rows per policy is kept.
    """
    from policies.registry import PolicyRegistry
    from training.corpus import BENIGN_POLICY
    from training.data import DataError, clean_rows, in_split, load_rows

    instructions = {p.name: p.instruction_text for p in meta.policies}
    registry = PolicyRegistry.load(policy_dirs)
    try:
        rows_read, _ = clean_rows(load_rows(paths))
    except DataError as exc:
        raise SystemExit(f"uniguard export: --val: {exc}") from exc
    by_policy: dict[str, list[tuple[str, str, int]]] = {}
    for row in rows_read:
        if not in_split(row, split) or row.policy == BENIGN_POLICY:  # benign rows name no policy of their own
            continue
        if row.policy not in instructions:
            if row.policy not in registry:
                raise SystemExit(
                    f"uniguard export: --val: unknown policy {row.policy!r}; "
                    "it is neither in the checkpoint nor in the registry (add --policy-dir)"
                )
            instructions[row.policy] = registry[row.policy].instruction_text()
        by_policy.setdefault(row.policy, []).append((instructions[row.policy], row.text, label_to_id(row.label)))
    rows: list[tuple[str, str, int]] = []
    rng = random.Random(seed)
    for name in sorted(by_policy):
        group = by_policy[name]
        if max_per_policy is not None and len(group) > max_per_policy:
            group = rng.sample(group, max_per_policy)
        rows += group
    if not rows:
        raise SystemExit(f"uniguard export: --val {', '.join(map(str, paths))}: no rows in split {split!r}")
    return rows


def register(sub: Any) -> None:
    export = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX",
        description="Export a UniGuard checkpoint to an ONNX model folder (model.onnx, tokenizer.json, "
        "manifest.json), gated by parity with the torch checkpoint on validation rows.",
    )
    export.add_argument("--model", type=Path, required=True, help="checkpoint folder (with uniguard_meta.json)")
    export.add_argument("--target", choices=TARGETS, required=True)
    export.add_argument(
        "--out", type=Path, required=True, help="output model folder (replaced only if it holds an export)"
    )
    export.add_argument(
        "--val",
        type=Path,
        nargs="+",
        default=None,
        metavar="FILE_OR_DIR",
        help="validation JSONL rows {text, label, policy} for the parity gate and the metrics "
        "(default: the policies' own examples)",
    )
    export.add_argument(
        "--split",
        choices=SPLIT_CHOICES,
        default="val",
        help="keep only --val rows of this hash split (default val; 'all' keeps every row)",
    )
    export.add_argument("--max-per-policy", type=int, default=None, help="sample at most N validation rows per policy")
    export.add_argument("--policy-dir", type=Path, action="append", default=[], help="extra policy folder")
    export.add_argument("--name", default=None, help="model name (default: the checkpoint's)")
    export.add_argument("--version", default=None, help="model version (default: today's date)")
    export.add_argument(
        "--recalibrate",
        nargs="?",
        const="f1",
        default=None,
        choices=("f1", "balanced"),
        help="re-fit per-policy thresholds on the ONNX scores of the --val rows: best F1 of the unsafe class "
        "(f1, the default when given) or best mean F1 of both classes (balanced: false positives weigh as "
        "much as misses)",
    )
    export.add_argument(
        "--target-fpr",
        type=float,
        default=None,
        help="with --recalibrate: the threshold with the best recall whose false-positive rate on the --val rows "
        "is at most this",
    )
    export.add_argument(
        "--recalibrate-min-rows",
        type=int,
        default=30,
        help="with --recalibrate: re-fit only policies with at least this many --val rows of each label; the others "
        "keep the checkpoint's threshold (default 30)",
    )
    export.add_argument("--isa", choices=("avx512_vnni", "avx2"), default=None, help="int8 config (default: detect)")
    export.add_argument(
        "--skip-parity", action="store_true", help="debugging only: skip the parity gate (recorded in the manifest)"
    )
    export.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from export.onnx import ExportError, Recalibration, export_checkpoint
    from export.parity import ParityError
    from training.meta import CheckpointMeta

    try:
        meta = CheckpointMeta.load(args.model)
    except (FileNotFoundError, ValidationError) as exc:
        print(f"uniguard export: --model {args.model}: {exc}", file=sys.stderr)
        return 2
    rows = load_val_rows(args.val, meta, args.policy_dir, args.max_per_policy, split=args.split) if args.val else None
    try:
        manifest = export_checkpoint(
            args.model,
            args.out,
            args.target,
            val_rows=rows,
            name=args.name,
            version=args.version,
            skip_parity=args.skip_parity,
            recalibrate=Recalibration(
                objective=args.recalibrate, target_fpr=args.target_fpr, min_rows=args.recalibrate_min_rows
            )
            if args.recalibrate
            else None,
            isa=args.isa,
        )
    except ParityError as exc:
        print(f"uniguard export: parity gate failed; nothing was written to {args.out}\n{exc}", file=sys.stderr)
        return 1
    except ExportError as exc:
        print(f"uniguard export: {exc}", file=sys.stderr)
        return 2
    size = sum(f.bytes for f in manifest.files.values()) / 1e6
    macro = manifest.metrics.get("macro", {})
    print(
        f"exported {manifest.model_id} ({manifest.target}) to {args.out}: {size:.1f} MB; "
        f"parity agreement {manifest.parity.get('agreement', 'skipped')}; macro-F1 {macro.get('f1', 'n/a')}"
    )
    return 0
