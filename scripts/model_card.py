"""Write the shipped model's card (models/<name>/README.md) from its manifest and eval JSON files.

Usage: python scripts/model_card.py MODEL_DIR TEST_JSON HELDOUT_JSON [SHO_TEST_JSON]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from export.manifest import Manifest
from export.model_card import write_model_card

KEYS = ("precision", "recall", "f1", "fpr", "auroc", "support")


def table(path: Path, title: str) -> str:
    data = json.loads(path.read_text(encoding="utf-8"))
    lines = [f"### {title}", "", "| policy | " + " | ".join(KEYS) + " |", "|---" * (len(KEYS) + 1) + "|"]
    for name, row in data.items():
        if not isinstance(row, dict) or "f1" not in row:
            continue
        cells = [
            "" if row.get(k) is None else (f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k])) for k in KEYS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    folder, test_json, heldout_json = (Path(a) for a in argv[:3])
    manifest = Manifest.load(folder)
    sections = [(test_json, "Test split of the shared data and the seed data (`--split test`)")]
    if len(argv) == 4:
        sections.append(
            (
                Path(argv[3]),
                "Source-held-out test (`sho_test`: whole public sources never trained on, benign rows under every "
                "policy; `uniguard data evalset`)",
            )
        )
    sections.append(
        (
            heldout_json,
            "Independent held-out prompts (training/data/heldout: written apart from the training data, "
            "never used for training or thresholds; includes three policies the model never saw)",
        )
    )
    evals = [table(path, title) for path, title in sections]
    write_model_card(
        folder,
        manifest,
        {
            "summary": (
                "UniGuard MiniLM: an instruction-conditioned guard classifier (all-MiniLM-L6-v2, 22M parameters) "
                "that judges a prompt against a policy given as text. It was trained on the public data in "
                "`../shared/data` (see the data sources below) and the project's hand-written seed data."
            ),
            "eval": "\n".join(evals),
            "how_to_rebuild": ["make model   # train -> merge -> export cpu-int8 -> eval -> this card"],
        },
    )
    print(f"wrote {folder / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
