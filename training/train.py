"""TaskGuard and MultiTaskGuard training: CE + λ_mlm·MLM + λ_adv·ALICE++ on instruction inputs.

Every input is built with ``policies.instruction`` exactly as the service builds it. The MLM
objective reads the prompt (and, when the seed row has one, its rationale) on its own; the
classification head only ever sees (policy, prompt) windows.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from policies.instruction import EncodingConfig, InstructionEncoder, Mode, Window, encoder_from_config
from policies.labels import ID2LABEL, LABEL2ID
from policies.schema import DataSource, PolicyRef
from scoring.core import pad_windows, policy_rows
from training.corpus import (
    DEFAULT_HOLDOUT,
    DEFAULT_POLICIES,
    SEED_SOURCE,
    Corpus,
    Example,
    build_corpus,
    cap_examples,
    load_paraphrases,
    load_policies,
    sample_epoch,
    text_hash,
)
from training.data import HELDOUT_SOURCES, DataError, load_all
from training.encoders import portable_name
from training.meta import CheckpointMeta
from training.metrics import BinaryMetrics, binary_metrics, calibrate_threshold, calibrate_threshold_mean, macro
from training.predict import torch_scorer

log = logging.getLogger("uniguard.train")


MinePool = Literal["everyday", "hard"]  # hard-negative mining pools (TrainConfig.mine_from)


class TrainConfig(BaseModel):
    """Every knob of a training run (recorded in the checkpoint's meta as the recipe)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["taskguard", "multitask"] = "multitask"
    # prefix: each policy text is encoded once per step and only the prompts read it (policies/instruction.py);
    # full: every token attends to every token (the 0.1/0.2 models). Recorded in encoding.mode.
    mode: Mode = "prefix"
    policy: str | None = None
    base: Path | None = None
    data: Path | None = None
    extra_data: list[Path] = Field(default_factory=list)
    seed_data: bool = True  # include training/data/seed/*.jsonl
    policy_dirs: list[Path] = Field(default_factory=list)
    out: Path = Path("runs/multitask")
    holdout: list[str] = Field(default_factory=lambda: list(DEFAULT_HOLDOUT))
    seed: int = 0  # initialisation, sampling and batch order; never the data split
    split_seed: int = 0  # the train/val/test hash split (must match `uniguard eval --seed` and the merge/export splits)
    epochs: int = 2
    examples_per_epoch: int = 4800
    batch_size: int = 16
    policies_per_batch: int = 4  # prefix mode: a batch holds the rows of at most this many policy texts
    lr: float = 8e-5
    warmup: float = 0.06
    time_decay: bool = True  # the learning rate also reaches zero when the time budget runs out
    weight_decay: float = 0.01
    max_minutes: float = 25.0
    mlm_weight: float = 0.1
    mlm_every: int = 2
    mlm_prob: float = 0.15
    adv_weight: float = 0.3
    adv_every: int = 4
    adv_eps: float = 1.0
    adv_sigma: float = 1e-3
    adv_alpha: float = 1.0
    paraphrase_prob: float = 0.5
    eval_every: int = 100
    patience: int = 3
    es_cap: int = 12
    es_max_per_policy: tuple[int, int] = (80, 24)  # (default policies, others)
    val_cap: int = 60
    val_max_per_policy: tuple[int, int] = (200, 48)
    # Source-held-out validation (whole sources never trained, training/data.py HELDOUT_SOURCES): early stopping
    # reads it beside the in-source val split, and a policy's threshold is calibrated on it when it holds at least
    # sho_min_rows of each label (else on the in-source val split).
    sho_es_cap: int = 12
    sho_val_cap: int = 60
    sho_max_per_policy: tuple[int, int] = (300, 48)
    sho_min_rows: int = 30
    # A default policy calibrated on its source-held-out rows takes the threshold with the best mean F1 over those
    # rows and its in-source validation rows of the project's own seed prompts (never trained on; written from the
    # policy texts, as users write prompts), when these hold seed_val_min_rows of each label: public held-out
    # sources alone put the threshold on their own score scale, which did not carry over to hand-written prompts
    # (docs/RESULTS.md §18). False: the source-held-out rows alone (the rule before §18).
    calibrate_with_seed_val: bool = True
    seed_val_min_rows: int = 10
    # A final fit: held-out sources this run trains on (their rows take the in-source train/val/test split), once
    # the recipe has been chosen with them held out. The sources left held out still select and calibrate.
    train_heldout: list[str] = Field(default_factory=list)
    # Over-defense: a threshold never lets more than this share of everyday benign prompts (benign/ sources) or of
    # held-out trigger-word benign prompts through as unsafe on the calibration rows (margins below the 3% / 10%
    # targets of issue 13).
    max_fpr_everyday: float = 0.025
    max_fpr_trigger: float = 0.08
    # True: the everyday floor holds on the held-out everyday sources' sho_val rows on their own too, not only pooled
    # with the in-source val rows of the everyday sources the model trains on (most of the pool; they score low).
    # Off by default: in two runs it cut every false-positive rate but moved the injection threshold up (0.74 -> 0.88,
    # 0.61 -> 0.76) and cost 2.0 and 3.3 points on the sources neither trained on (docs/RESULTS.md §22).
    heldout_everyday_floor: bool = False
    # The floors are read on every benign row of the val and sho_val splits under each default policy (up to this
    # many per policy), not on the capped calibration rows alone: there a policy has a few dozen everyday rows, so
    # 2.5% is one prompt and a single high score pinned thresholds at their 0.95 bound (docs/RESULTS.md §13).
    floor_max_per_policy: int = 1200
    # Hard negatives for those floors: from the second epoch on, each epoch scores mine_pool safe training rows
    # per default policy from each of the mine_from pools (everyday: the benign/ prompts; hard: the policy's own
    # safe rows, such as benign role-play and sensitive-topic questions) with the model as it stands and adds the
    # mine_top highest-scoring ones of each, mine_copies times each, to the epoch's sample; the upper tail of the
    # benign scores is what sets the floors (docs/RESULTS.md §17-19). mine_top 0 turns it off.
    mine_pool: int = 300
    mine_top: int = 40
    mine_copies: int = 2
    mine_from: tuple[MinePool, ...] = ("everyday", "hard")
    eval_max_chars: int = 4000
    threads: int = 2
    bf16: bool = False  # bfloat16 autocast: oneDNN re-JITs kernels for every new shape on CPU (slow)
    pad_multiple: int = 8  # pad batches to a multiple of this length: few distinct shapes
    encoding: EncodingConfig = Field(default_factory=EncodingConfig)

    @field_validator("train_heldout")
    @classmethod
    def _known_heldout_sources(cls, sources: list[str]) -> list[str]:
        unknown = sorted(set(sources) - HELDOUT_SOURCES)
        if unknown:
            raise ValueError(
                f"--train-heldout {', '.join(unknown)}: not a held-out source (choose from "
                f"{', '.join(sorted(HELDOUT_SOURCES))})"
            )
        return sorted(set(sources))

    @model_validator(mode="after")
    def _mode_is_the_encoding_mode(self) -> TrainConfig:
        if "encoding" not in self.model_fields_set and self.mode == "prefix":
            # The policy is encoded once, so its length costs little: room for the longest default policy text
            # (~185 tokens) and a long query window (MiniLM and e5 have 512 positions).
            self.encoding = EncodingConfig(mode="prefix", max_length=512, max_policy_tokens=224)
        if self.encoding.mode != self.mode:
            self.encoding = self.encoding.model_copy(update={"mode": self.mode})
        return self


def base_model_dir(base: Path | None) -> Path:
    """--base: a Hugging Face folder or a named base encoder (training/encoders.py); None is MiniLM."""
    from training.encoders import resolve_base

    return resolve_base(base)


# --- inputs -------------------------------------------------------------------------------------


class WindowBuilder:
    """Training windows: the window of the query that carries its label (first, or last for indirect)."""

    def __init__(self, encoder: InstructionEncoder) -> None:
        self.encoder = encoder
        self._enc: dict[str, Any] = {}

    def prepare(self, texts: Sequence[str]) -> None:
        missing = sorted({t for t in texts if t not in self._enc})
        for start in range(0, len(missing), 2048):
            chunk = missing[start : start + 2048]
            self._enc.update(zip(chunk, self.encoder.tokenize_queries(chunk), strict=True))

    def query_length(self, example: Example) -> int:
        """Tokens of the example's prompt."""
        if example.text not in self._enc:
            self.prepare([example.text])
        return len(self._enc[example.text].ids)

    def window(self, policy_text: str, example: Example) -> Window:
        if example.text not in self._enc:
            self.prepare([example.text])
        ws = self.encoder.windows(self.encoder.policy_ids(policy_text), self._enc[example.text], example.text)
        return ws[-1] if example.window == "last" else ws[0]


def bucketed_batches(
    items: list[Any], length: Callable[[Any], int], batch_size: int, rng: random.Random
) -> list[list[Any]]:
    """Batches of similar length: sort within mega-batches of 50 batches, then shuffle the batches."""
    batches: list[list[Any]] = []
    mega = batch_size * 50
    for start in range(0, len(items), mega):
        chunk = sorted(items[start : start + mega], key=length)
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def policy_grouped_batches(
    examples: Sequence[Example],
    choose_text: Callable[[str], str],
    window: Callable[[str, Example], Window],
    query_length: Callable[[Example], int],
    batch_size: int,
    policies_per_batch: int,
    rng: random.Random,
) -> list[list[tuple[Window, Example]]]:
    """Prefix mode: batches of ``batch_size`` rows from at most ``policies_per_batch`` policy texts, so each text is
    encoded once per step and its keys/values serve its rows. Each policy's examples are length-sorted and cut into
    pieces of ``batch_size // policies_per_batch`` rows reading one text (``choose_text``: canonical or a
    paraphrase); pieces of similar length are joined into batches (``bucketed_batches``)."""
    rows_per_piece = max(1, batch_size // policies_per_batch)
    by_policy: dict[str, list[Example]] = {}
    for e in examples:
        by_policy.setdefault(e.policy, []).append(e)
    pieces: list[list[tuple[Window, Example]]] = []
    for policy in sorted(by_policy):
        group = sorted(by_policy[policy], key=query_length)
        for start in range(0, len(group), rows_per_piece):
            text = choose_text(policy)
            pieces.append([(window(text, e), e) for e in group[start : start + rows_per_piece]])
    rng.shuffle(pieces)
    joined = bucketed_batches(pieces, lambda piece: max(len(w) for w, _ in piece), policies_per_batch, rng)
    return [[row for piece in batch for row in piece] for batch in joined]


def pad_to_multiple(inputs: dict[str, np.ndarray], multiple: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad a padded batch further so its length is a multiple of ``multiple`` (ids with ``pad_id``)."""
    width = inputs["input_ids"].shape[1]
    extra = (-width) % multiple if multiple > 1 else 0
    if not extra:
        return inputs
    return {
        k: np.pad(v, ((0, 0), (0, extra)), constant_values=pad_id if k == "input_ids" else 0) for k, v in inputs.items()
    }


# --- MLM ----------------------------------------------------------------------------------------


class MLM:
    """Masked-LM auxiliary objective on prompts (+ rationales), with a head tied to the word embeddings."""

    def __init__(self, model: Any, tokenizer_file: Path, prob: float, seed: int) -> None:
        import torch
        from tokenizers import Tokenizer
        from transformers.models.bert.modeling_bert import BertOnlyMLMHead

        self.model = model
        self.head = BertOnlyMLMHead(model.config)
        self.head.predictions.decoder.weight = model.get_input_embeddings().weight
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=128)
        self.mask_id = self.tokenizer.token_to_id("[MASK]")
        if self.mask_id is None:  # XLM-R and MPNet vocabularies (e5-small, mpnet) call it <mask>
            self.mask_id = self.tokenizer.token_to_id("<mask>")
        if self.mask_id is None:
            raise ValueError("MLM needs a [MASK] or <mask> token in the tokenizer; pass --mlm-weight 0")
        self.prob = prob
        self.vocab = model.config.vocab_size
        self.gen = torch.Generator().manual_seed(seed)

    def parameters(self) -> list[Any]:
        return [p for n, p in self.head.named_parameters() if "decoder.weight" not in n]

    def loss(self, examples: Sequence[Example]) -> Any:
        import torch
        import torch.nn.functional as F

        encs = [
            self.tokenizer.encode(e.text, e.rationale) if e.rationale else self.tokenizer.encode(e.text)
            for e in examples
        ]
        width = max(len(e.ids) for e in encs)
        ids = torch.zeros((len(encs), width), dtype=torch.long)
        types = torch.zeros_like(ids)
        attn = torch.zeros_like(ids)
        special = torch.ones_like(ids, dtype=torch.bool)
        for i, e in enumerate(encs):
            n = len(e.ids)
            ids[i, :n] = torch.tensor(e.ids)
            types[i, :n] = torch.tensor(e.type_ids)
            attn[i, :n] = 1
            special[i, :n] = torch.tensor(e.special_tokens_mask, dtype=torch.bool)
        chosen = (torch.rand(ids.shape, generator=self.gen) < self.prob) & ~special
        if not chosen.any():
            return torch.zeros(())
        labels = ids[chosen].clone()
        r = torch.rand(ids.shape, generator=self.gen)
        masked = ids.clone()
        masked[chosen & (r < 0.8)] = self.mask_id
        rand_pos = chosen & (r >= 0.8) & (r < 0.9)
        masked[rand_pos] = torch.randint(self.vocab, (int(rand_pos.sum()),), generator=self.gen)
        hidden = self.model.base_model(input_ids=masked, attention_mask=attn, token_type_ids=types).last_hidden_state
        logits = self.head(hidden[chosen])
        return F.cross_entropy(logits.float(), labels)


# --- evaluation ---------------------------------------------------------------------------------


def score_examples(
    model: Any,
    encoder: InstructionEncoder,
    examples: Sequence[Example],
    policy_texts: dict[str, str],
    max_chars: int | None = None,
    batch_size: int = 64,
    bf16: bool = False,
) -> np.ndarray:
    """P(unsafe) per example with the canonical policy text, max over windows (as served)."""
    if not examples:
        return np.zeros(0)
    pairs = [(policy_texts[e.policy], e.text[:max_chars] if max_chars else e.text) for e in examples]
    scores = torch_scorer(model, encoder, "bf16" if bf16 else "fp32").score_pairs(pairs, batch_size)
    return np.array([s.score for s in scores])


def per_policy_metrics(
    examples: Sequence[Example],
    scores: np.ndarray,
    thresholds: dict[str, float] | None = None,
    default_threshold: float = 0.5,
) -> dict[str, BinaryMetrics]:
    """Metrics per policy; thresholds calibrated here (best F1) unless given."""
    out: dict[str, BinaryMetrics] = {}
    by_policy: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        by_policy.setdefault(e.policy, []).append(i)
    for policy, idx in sorted(by_policy.items()):
        s = scores[idx]
        y = np.array([examples[i].label for i in idx])
        t = (thresholds or {}).get(policy)
        if t is None:
            t = default_threshold if thresholds is not None else calibrate_threshold(s, y)
        out[policy] = binary_metrics(s, y, t)
    return out


def source_macro(examples: Sequence[Example], scores: np.ndarray, thresholds: dict[str, float]) -> dict[str, float]:
    """Per policy: accuracy averaged over (source, label) strata, so no source's style dominates."""
    acc: dict[tuple[str, str, int], list[bool]] = {}
    for e, s in zip(examples, scores, strict=True):
        pred = int(s >= thresholds.get(e.policy, 0.5))
        acc.setdefault(e.stratum, []).append(pred == e.label)
    per_policy: dict[str, list[float]] = {}
    for (policy, _src, _y), hits in acc.items():
        per_policy.setdefault(policy, []).append(sum(hits) / len(hits))
    return {p: macro(v) for p, v in sorted(per_policy.items())}


# --- phases -------------------------------------------------------------------------------------


def build_training_corpus(cfg: TrainConfig) -> Corpus:
    rows = load_all(cfg.data, cfg.extra_data, seed=cfg.seed_data)
    policies = load_policies(cfg.policy_dirs)
    if cfg.kind == "taskguard":
        if not cfg.policy or cfg.policy not in policies:
            known = ", ".join(sorted(policies))
            raise DataError(f"--policy {cfg.policy!r} is not a known policy (known: {known})")
        chosen = {cfg.policy: policies[cfg.policy]}
        return build_corpus(rows, chosen, {}, holdout=(), seed=cfg.seed, split_seed=cfg.split_seed, cross_per_policy=0)
    return build_corpus(
        rows,
        policies,
        load_paraphrases(),
        holdout=cfg.holdout,
        seed=cfg.seed,
        split_seed=cfg.split_seed,
        train_heldout=cfg.train_heldout,
    )


@dataclass(frozen=True)
class EvalSets:
    """The examples of one run: training, early stopping, calibration and zero-shot (held-out policies)."""

    train: list[Example]
    early_stop: list[Example]
    calibration: list[Example]
    zero_shot: list[Example]
    defaults: tuple[str, ...]  # the registry's default policies: a larger share of every capped set
    sho_early_stop: list[Example] = field(default_factory=list)  # source-held-out (sho_val) rows
    sho_calibration: list[Example] = field(default_factory=list)
    floor: list[Example] = field(default_factory=list)  # benign val/sho_val rows of the default policies (floors)
    seed_calibration: list[Example] = field(default_factory=list)  # the default policies' seed rows of the val split


def _capped(
    examples: Sequence[Example], defaults: Sequence[str], cap: int, seed: int, limits: tuple[int, int]
) -> list[Example]:
    """Capped evaluation set: more rows for the default policies than for derived/custom ones."""
    dflt = [e for e in examples if e.policy in defaults]
    other = [e for e in examples if e.policy not in defaults]
    return cap_examples(dflt, cap, seed, limits[0]) + cap_examples(other, cap, seed, limits[1])


def evaluation_sets(cfg: TrainConfig, corpus: Corpus) -> EvalSets:
    trained = corpus.trained
    if not trained:
        raise DataError("no policy has both safe and unsafe training rows; check --data and the seed files")
    defaults = DEFAULT_POLICIES  # the registry's enabled_by_default policies
    val_all = corpus.select("val", trained)
    held_out = [e for e in corpus.examples if e.policy in corpus.holdout and (e.split != "train" or e.kind != "cross")]
    sho_all = corpus.select("sho_val", trained)
    return EvalSets(
        train=corpus.select("train", trained),
        early_stop=_capped(val_all, defaults, cfg.es_cap, cfg.seed, cfg.es_max_per_policy),
        calibration=_capped(val_all, defaults, cfg.val_cap, cfg.seed, cfg.val_max_per_policy),
        zero_shot=_capped(held_out, defaults, cfg.val_cap, cfg.seed, cfg.val_max_per_policy),
        defaults=defaults,
        sho_early_stop=_capped(sho_all, defaults, cfg.sho_es_cap, cfg.seed, cfg.sho_max_per_policy),
        sho_calibration=_capped(sho_all, defaults, cfg.sho_val_cap, cfg.seed, cfg.sho_max_per_policy),
        floor=floor_rows(val_all + sho_all, defaults, cfg.floor_max_per_policy, cfg.seed),
        seed_calibration=[e for e in val_all if e.policy in defaults and e.source == SEED_SOURCE],
    )


def floor_rows(examples: Sequence[Example], defaults: Sequence[str], per_policy: int, seed: int) -> list[Example]:
    """The benign rows that set the false-positive floors: everyday and held-out trigger-word prompts labelled safe
    under a default policy, at most ``per_policy`` of each kind per policy, chosen by text hash."""
    out: list[Example] = []
    for policy in defaults:
        safe = [e for e in examples if e.policy == policy and e.label == 0]
        everyday = [e for e in safe if _everyday(e)]
        trigger = [e for e in safe if _trigger_word(e)]
        for kind in (everyday, trigger):
            out += sorted(kind, key=lambda e: text_hash(e.text, seed + 7))[:per_policy]
    return out


def mining_pool(
    train: Sequence[Example], defaults: Sequence[str], per_policy: int, rng: random.Random, pool: MinePool
) -> list[Example]:
    """Up to ``per_policy`` safe training rows of each default policy, drawn at random from one pool: ``everyday``
    benign prompts, or ``hard`` negatives (the policy's own safe rows that are not everyday prompts; never
    cross-policy or derived rows): the rows whose highest scores hard-negative mining looks for."""
    by_policy: dict[str, list[Example]] = {policy: [] for policy in defaults}
    for e in train:  # one pass over the training rows, in their order
        if e.policy in by_policy and e.label == 0 and e.split == "train":
            everyday = _everyday(e)
            keep = everyday if pool == "everyday" else (e.kind == "native" and not everyday)
            if keep:
                by_policy[e.policy].append(e)
    out: list[Example] = []
    for policy in defaults:
        rows = by_policy[policy]
        out += rng.sample(rows, min(per_policy, len(rows)))
    return out


def hardest(pool: Sequence[Example], scores: np.ndarray, top: int) -> list[tuple[Example, float]]:
    """The ``top`` highest-scoring rows of each policy in ``pool``, with their scores."""
    out: list[tuple[Example, float]] = []
    for policy in sorted({e.policy for e in pool}):
        ranked = sorted(
            ((e, float(s)) for e, s in zip(pool, scores, strict=True) if e.policy == policy), key=lambda t: -t[1]
        )
        out += ranked[:top]
    return out


class TrainRun(BaseModel):
    """What the loop did: evaluation history, the best step (whose weights were kept), why it stopped."""

    history: list[dict[str, Any]]
    best_step: int
    steps: int
    stop_reason: str
    train_seconds: float
    data_sources: list[DataSource]


class Calibration(BaseModel):
    """Thresholds fitted on the validation pairs, and the metrics at those thresholds."""

    thresholds: dict[str, float]
    default_threshold: float
    val: dict[str, BinaryMetrics]
    val_source_macro: dict[str, float]
    zero_shot: dict[str, BinaryMetrics]
    sho_val: dict[str, BinaryMetrics] = Field(default_factory=dict)  # at the thresholds, on the held-out sources
    calibrated_on: dict[str, str] = Field(default_factory=dict)  # per policy: which rows set its threshold


class Trainer:
    """The optimisation loop: CE + λ_mlm·MLM + λ_adv·ALICE++, periodic evaluation, early stopping, time budget."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: Any,
        encoder: InstructionEncoder,
        tokenizer_file: Path,
        corpus: Corpus,
        sets: EvalSets,
        started: float,
    ) -> None:
        import torch

        from training.alice import perturbable_modules
        from training.prefix import prefix_adapter

        self.cfg, self.model, self.encoder, self.corpus, self.sets = cfg, model, encoder, corpus, sets
        self.started = started
        self.rng = random.Random(cfg.seed)
        self.builder = WindowBuilder(encoder)
        self.canonical = {name: corpus.policies[name].instruction_text() for name in corpus.policies}
        self.variants = {name: corpus.policy_texts(name) for name in corpus.policies}
        self.adapter = prefix_adapter(model) if cfg.mode == "prefix" else None
        self.n_perturb = len(perturbable_modules(model)) if cfg.adv_weight > 0 else 0
        self.mlm = MLM(model, tokenizer_file, cfg.mlm_prob, cfg.seed) if cfg.mlm_weight > 0 else None
        named = list(model.named_parameters()) + (
            [(f"mlm.{n}", p) for n, p in self.mlm.head.named_parameters() if "decoder.weight" not in n]
            if self.mlm
            else []
        )
        self.params = [p for _, p in named]
        no_decay = ("bias", "LayerNorm.weight", "layer_norm", "norm.weight")
        groups = [
            {"params": [p for n, p in named if not any(k in n for k in no_decay)], "weight_decay": cfg.weight_decay},
            {"params": [p for n, p in named if any(k in n for k in no_decay)], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=True)  # fused: ~7x faster step on CPU
        self.steps_per_epoch = math.ceil(min(cfg.examples_per_epoch, max(len(sets.train), 1)) / cfg.batch_size)
        total_steps = max(1, self.steps_per_epoch * cfg.epochs)
        warm = max(1, int(cfg.warmup * total_steps))
        self.train_window: tuple[float, float] | None = None  # (start, end) of the training time, set by run()

        def lr_factor(step: int) -> float:
            """Linear warm-up, then linear decay to zero at the last step or at the end of the time budget,
            whichever comes first (a run cut short by its budget still anneals)."""
            if step < warm:
                return (step + 1) / warm
            by_steps = max(0.0, (total_steps - step) / max(1, total_steps - warm))
            if not cfg.time_decay or self.train_window is None:
                return by_steps
            start, end = self.train_window
            by_time = max(0.0, (end - time.monotonic()) / max(1e-6, end - start))
            return min(by_steps, by_time)

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)
        self.history: list[dict[str, Any]] = []
        self.best_score, self.best_state, self.best_step = -1.0, None, 0
        self.bad_evals = 0
        self.eval_rate = 0.0  # pairs per second, measured on the first evaluation
        self.counts: Counter[tuple[str, str, str]] = Counter()

    # -- evaluation and budget --------------------------------------------------------------------
    def evaluate(self, step: int) -> None:
        """Macro-F1 on the in-source val split and on the source-held-out val rows; the model is chosen on their
        mean (SHO alone would ignore the policies that have no held-out source)."""
        t = time.monotonic()
        examples = self.sets.early_stop + self.sets.sho_early_stop
        scores = score_examples(self.model, self.encoder, examples, self.canonical, self.cfg.eval_max_chars)
        self.eval_rate = len(examples) / max(time.monotonic() - t, 1e-6)
        n_in = len(self.sets.early_stop)
        metrics = per_policy_metrics(examples[:n_in], scores[:n_in])
        in_source = macro([m.f1 for m in metrics.values()])
        dflt = macro([m.f1 for p, m in metrics.items() if p in self.sets.defaults])
        sho_examples = examples[n_in:]
        sho_metrics = per_policy_metrics(sho_examples, scores[n_in:]).values()
        sho = [m.f1 for m in sho_metrics if 0 < m.positives < m.support]  # policies with both labels held out
        sho_macro = macro(sho) if sho else in_source
        value = (in_source + sho_macro) / 2
        seconds = time.monotonic() - self.started
        self.history.append(
            {
                "step": step,
                "macro_f1": in_source,
                "default_macro_f1": dflt,
                "sho_macro_f1": sho_macro,
                "score": value,
                "seconds": seconds,
            }
        )
        log.info(
            "step %d: val macro-F1 %.4f (defaults %.4f), source-held-out %.4f; %.1f pairs/s",
            step,
            in_source,
            dflt,
            sho_macro,
            self.eval_rate,
        )
        if value > self.best_score:
            self.best_score, self.best_state, self.best_step = value, copy.deepcopy(self.model.state_dict()), step
            self.bad_evals = 0
        else:
            self.bad_evals += 1

    def reserve_seconds(self) -> float:
        """Time kept for calibration and zero-shot scoring at the end, from the measured evaluation speed."""
        rate = self.eval_rate or 30.0
        sets = self.sets
        rows = len(sets.calibration) + len(sets.sho_calibration) + len(sets.floor) + len(sets.zero_shot)
        return rows / rate + 30.0

    # -- batches ----------------------------------------------------------------------------------
    def hard_negatives(self) -> list[Example]:
        """The safe training rows of each mining pool the model now scores highest under each default policy."""
        cfg = self.cfg
        if cfg.mine_top <= 0:
            return []
        pools = {
            kind: mining_pool(self.sets.train, self.sets.defaults, cfg.mine_pool, self.rng, kind)
            for kind in cfg.mine_from
        }
        rows = [e for pool in pools.values() for e in pool]
        if not rows:
            return []
        scores = score_examples(self.model, self.encoder, rows, self.canonical, cfg.eval_max_chars)
        mined: list[Example] = []
        start = 0
        for kind, pool in pools.items():
            picks = hardest(pool, scores[start : start + len(pool)], cfg.mine_top)
            start += len(pool)
            lowest: dict[str, float] = {}
            for e, score in picks:
                lowest[e.policy] = min(score, lowest.get(e.policy, 1.0))
            log.info(
                "hard negatives (%s): %d rows, %d times each (top %d of %d per default policy; lowest kept score %s)",
                kind,
                len(picks),
                cfg.mine_copies,
                cfg.mine_top,
                cfg.mine_pool,
                ", ".join(f"{p} {v:.2f}" for p, v in sorted(lowest.items())),
            )
            mined += [e for e, _ in picks for _ in range(cfg.mine_copies)]
        return mined

    def epoch_batches(self, epoch: int = 0) -> list[list[tuple[Window, Example]]]:
        """One epoch's sample as length-bucketed batches of (window, example); a policy text or a paraphrase.
        From the second epoch on the sample also holds the mined hard negatives (``mine_top``)."""
        cfg, rng = self.cfg, self.rng
        sample = sample_epoch(
            self.sets.train, min(cfg.examples_per_epoch, len(self.sets.train)), rng, defaults=self.sets.defaults
        )
        if epoch > 0 and cfg.mine_top > 0:
            sample += self.hard_negatives()
            rng.shuffle(sample)
        self.builder.prepare([e.text for e in sample])
        self.counts.update((e.source, e.license, e.policy) for e in sample)

        def choose_text(policy: str) -> str:
            texts = self.variants[policy]
            return texts[0] if len(texts) == 1 or rng.random() >= cfg.paraphrase_prob else rng.choice(texts[1:])

        if cfg.mode == "prefix":
            return policy_grouped_batches(
                sample,
                choose_text,
                self.builder.window,
                self.builder.query_length,
                cfg.batch_size,
                cfg.policies_per_batch,
                rng,
            )
        items = [(self.builder.window(choose_text(e.policy), e), e) for e in sample]
        return bucketed_batches(items, lambda it: len(it[0]), cfg.batch_size, rng)

    # -- one optimisation step --------------------------------------------------------------------
    def runner(self, windows: list[Window]) -> tuple[Any, Any]:
        """The batch's forward as a function of an ALICE++ perturbation, and the perturbable positions' mask.

        Prefix mode encodes each distinct policy text once; its keys/values serve the clean and the adversarial
        passes of the step (the policy states are shared and never perturbed)."""
        import torch

        from training.alice import hf_runner
        from training.prefix import batch_logits, encode_policies

        pad, multiple = self.encoder.pad_id, self.cfg.pad_multiple
        query = {k: torch.from_numpy(v) for k, v in pad_to_multiple(pad_windows(windows, pad), multiple, pad).items()}
        if self.adapter is None:
            return hf_runner(self.model, query), query["attention_mask"]
        segments, index = policy_rows(windows)
        seg = {k: torch.from_numpy(v) for k, v in pad_to_multiple(pad_windows(segments, pad), multiple, pad).items()}
        kv = encode_policies(self.adapter, seg["input_ids"], seg["token_type_ids"], seg["attention_mask"])
        rows = torch.from_numpy(index)
        return (lambda perturb: batch_logits(self.adapter, query, seg, rows, kv, perturb)), query["attention_mask"]

    def step(self, step: int, batch: list[tuple[Window, Example]]) -> dict[str, float]:
        import torch
        import torch.nn.functional as F

        from training.alice import alice_loss

        cfg = self.cfg
        labels = torch.tensor([e.label for _, e in batch])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            run, mask = self.runner([w for w, _ in batch])
            logits = run(None)
            loss = F.cross_entropy(logits.float(), labels)
            parts = {"ce": loss.item()}
            if self.n_perturb and step % cfg.adv_every == 0:
                adv = alice_loss(
                    run,
                    mask,
                    labels,
                    logits,
                    layer=self.rng.randrange(self.n_perturb),
                    eps=cfg.adv_eps,
                    sigma=cfg.adv_sigma,
                    alpha=cfg.adv_alpha,
                )
                loss = loss + cfg.adv_weight * adv.loss
                parts["adv"] = adv.loss.item()
            if self.mlm is not None and step % cfg.mlm_every == 0:
                mlm_loss = self.mlm.loss([e for _, e in batch])
                loss = loss + cfg.mlm_weight * mlm_loss
                parts["mlm"] = mlm_loss.item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return parts

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, deadline: float) -> TrainRun:
        """Train until the epochs are done, early stopping triggers or the budget runs out; keep the best state."""
        from tqdm import tqdm

        cfg = self.cfg
        step, stop = 0, ""
        self.train_window = (time.monotonic(), deadline - self.reserve_seconds())
        log.info("training: %d epochs x %d steps, batch %d", cfg.epochs, self.steps_per_epoch, cfg.batch_size)
        for epoch in range(cfg.epochs):
            batches = self.epoch_batches(epoch)
            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", mininterval=10, dynamic_ncols=True)
            for batch in bar:
                parts = self.step(step, batch)
                step += 1
                bar.set_postfix({k: f"{v:.3f}" for k, v in parts.items()}, refresh=False)
                if step % cfg.eval_every == 0:
                    self.evaluate(step)
                    if self.bad_evals >= cfg.patience:
                        stop = f"early stop: no val improvement in {cfg.patience} evaluations"
                        break
                if time.monotonic() > deadline - self.reserve_seconds():
                    stop = f"time budget of {cfg.max_minutes} min reached"
                    break
            bar.close()
            if stop:
                break
        if not self.history or self.history[-1]["step"] != step:
            self.evaluate(step)
        log.info("%s", stop or f"finished {cfg.epochs} epochs ({step} steps)")
        self.model.load_state_dict(self.best_state)
        return TrainRun(
            history=self.history,
            best_step=self.best_step,
            steps=step,
            stop_reason=stop or "completed",
            train_seconds=time.monotonic() - self.started,
            data_sources=[
                DataSource(source=s, license=lic, policy=p, rows=n) for (s, lic, p), n in sorted(self.counts.items())
            ],
        )


def fpr_floor(scores: np.ndarray, max_fpr: float) -> float:
    """The lowest threshold at which at most ``max_fpr`` of these safe rows score as unsafe (0 without rows)."""
    if scores.size == 0:
        return 0.0
    allowed = int(np.floor(max_fpr * scores.size))
    ordered = np.sort(scores)[::-1]
    if allowed >= ordered.size:
        return 0.0
    return float(np.nextafter(ordered[allowed], 1.0))  # just above the first score that must stay safe


def policy_floor(
    cfg: TrainConfig,
    policy: str,
    everyday: Sequence[tuple[Example, float]],
    trigger: Sequence[tuple[Example, float]],
) -> float:
    """The lowest threshold of ``policy`` that keeps the everyday benign rows within ``max_fpr_everyday`` (pooled,
    and on the held-out sources' sho_val rows alone with ``heldout_everyday_floor``) and the trigger-word rows
    within ``max_fpr_trigger``."""
    mine_everyday = [(e, sc) for e, sc in everyday if e.policy == policy]
    floors = [
        fpr_floor(np.array([sc for _, sc in mine_everyday]), cfg.max_fpr_everyday),
        fpr_floor(np.array([sc for e, sc in trigger if e.policy == policy]), cfg.max_fpr_trigger),
    ]
    if cfg.heldout_everyday_floor:
        held = [sc for e, sc in mine_everyday if e.split == "sho_val"]
        floors.append(fpr_floor(np.array(held), cfg.max_fpr_everyday))
    return max(floors)


def calibrate(
    cfg: TrainConfig, model: Any, encoder: InstructionEncoder, sets: EvalSets, policy_texts: dict[str, str]
) -> Calibration:
    """Per-policy thresholds: best F1 on the source-held-out validation rows when they hold ``sho_min_rows`` of each
    label (best mean F1 over those and the policy's seed val rows when ``calibrate_with_seed_val`` and these hold
    ``seed_val_min_rows`` of each label), else on the in-source validation rows; never below the floor that keeps the
    false-positive rate on everyday benign prompts within ``max_fpr_everyday`` and on held-out trigger-word prompts
    within ``max_fpr_trigger``. ``default_threshold`` on the non-default policies' in-source rows pooled (custom and
    unseen policies get it); zero-shot metrics of the held-out policies at it."""
    val, sho = sets.calibration, sets.sho_calibration
    seen = {(e.policy, e.text) for e in val + sho}
    extra = [e for e in sets.floor if (e.policy, e.text) not in seen]
    seen |= {(e.policy, e.text) for e in extra}
    extra += [e for e in sets.seed_calibration if (e.policy, e.text) not in seen]
    log.info(
        "calibrating thresholds on %d in-source and %d source-held-out validation pairs (+%d pairs more: benign "
        "rows for the false-positive floors and the default policies' seed val rows)",
        len(val),
        len(sho),
        len(extra),
    )
    scores = score_examples(model, encoder, val + sho + extra, policy_texts)
    val_scores, sho_scores = scores[: len(val)], scores[len(val) : len(val) + len(sho)]
    benign = [(e, sc) for e, sc in zip(val + sho + extra, scores, strict=True) if e.label == 0]
    seed_keys = {(e.policy, e.text) for e in sets.seed_calibration}
    scored_seed = [(e, sc) for e, sc in zip(val + sho + extra, scores, strict=True) if (e.policy, e.text) in seed_keys]
    everyday = [(e, sc) for e, sc in benign if _everyday(e)]
    trigger = [(e, sc) for e, sc in benign if _trigger_word(e)]
    thresholds: dict[str, float] = {}
    calibrated_on: dict[str, str] = {}
    for policy in sorted({e.policy for e in val} | {e.policy for e in sho}):
        held = [(e.label, sc) for e, sc in zip(sho, sho_scores, strict=True) if e.policy == policy]
        labels = [y for y, _ in held]
        use_sho = min(labels.count(0), labels.count(1)) >= cfg.sho_min_rows
        rows = held if use_sho else [(e.label, sc) for e, sc in zip(val, val_scores, strict=True) if e.policy == policy]
        if not rows:
            continue
        floor = policy_floor(cfg, policy, everyday, trigger)
        y = np.array([r[0] for r in rows])
        s = np.array([r[1] for r in rows])
        bounds = (max(0.05, min(floor, 0.95)), 0.95)
        seed = [(e.label, sc) for e, sc in scored_seed if e.policy == policy]
        seed_labels = [lab for lab, _ in seed]
        enough_seed = min(seed_labels.count(0), seed_labels.count(1)) >= cfg.seed_val_min_rows
        if use_sho and cfg.calibrate_with_seed_val and enough_seed:
            seed_part = (np.array([sc for _, sc in seed]), np.array(seed_labels))
            thresholds[policy] = calibrate_threshold_mean([(s, y), seed_part], bounds=bounds)
            where = f"source-held-out val + {len(seed)} seed val rows (mean F1)"
        else:
            thresholds[policy] = calibrate_threshold(s, y, bounds=bounds)
            where = "source-held-out val" if use_sho else "in-source val"
        calibrated_on[policy] = where + (f", floor {floor:.3f}" if floor > 0.05 else "")
    val_metrics = per_policy_metrics(val, val_scores, thresholds=thresholds)
    sho_metrics = per_policy_metrics(sho, sho_scores, thresholds=thresholds) if sho else {}
    pooled = [i for i, e in enumerate(val) if e.policy not in sets.defaults] or list(range(len(val)))
    default_threshold = calibrate_threshold(val_scores[pooled], np.array([val[i].label for i in pooled]))
    zero_shot: dict[str, BinaryMetrics] = {}
    if sets.zero_shot:
        zs_scores = score_examples(model, encoder, sets.zero_shot, policy_texts)
        zero_shot = per_policy_metrics(sets.zero_shot, zs_scores, thresholds={}, default_threshold=default_threshold)
    return Calibration(
        thresholds=thresholds,
        default_threshold=default_threshold,
        val=val_metrics,
        val_source_macro=source_macro(val, val_scores, thresholds),
        zero_shot=zero_shot,
        sho_val=sho_metrics,
        calibrated_on=calibrated_on,
    )


def _trigger_word(e: Example) -> bool:
    """A benign prompt full of trigger words from a source held out of training (its sho_val half), or, in a final
    fit that trains on that source (``train_heldout``), from its in-source val split: rows never trained on."""
    from training.data import TRIGGER_WORD_SOURCES

    return e.split in ("sho_val", "val") and e.source in TRIGGER_WORD_SOURCES


def _everyday(e: Example) -> bool:
    """An everyday benign prompt (the benign files), as opposed to a hard negative."""
    from training.data import EVERYDAY_BENIGN_SOURCES

    return (e.kind == "benign" and e.source != "clinc150_meta") or e.source in EVERYDAY_BENIGN_SOURCES


def calibration_metrics(cal: Calibration, sets: EvalSets) -> dict[str, Any]:
    """The checkpoint meta's metrics that calibration sets (thresholds' val, source-held-out and zero-shot scores)."""

    def dump(metrics: dict[str, BinaryMetrics]) -> dict[str, Any]:
        return {p: m.model_dump() for p, m in metrics.items()}

    return {
        "val": dump(cal.val),
        "val_macro_f1": macro([m.f1 for m in cal.val.values()]),
        "val_default_macro_f1": macro([m.f1 for p, m in cal.val.items() if p in sets.defaults]),
        "val_source_macro_accuracy": cal.val_source_macro,
        "sho_val": dump(cal.sho_val),
        "sho_val_macro_f1": macro([m.f1 for m in cal.sho_val.values() if 0 < m.positives < m.support]),
        "calibrated_on": cal.calibrated_on,
        "zero_shot": dump(cal.zero_shot),
        "zero_shot_macro_f1": macro([m.f1 for m in cal.zero_shot.values()]),
    }


def checkpoint_meta(
    cfg: TrainConfig, base: Path, corpus: Corpus, sets: EvalSets, run: TrainRun, cal: Calibration, started: float
) -> CheckpointMeta:
    return CheckpointMeta(
        kind=cfg.kind,
        name=f"taskguard-{cfg.policy}" if cfg.kind == "taskguard" and cfg.policy else cfg.kind,
        base_model=portable_name(base),
        policies=[PolicyRef.of(corpus.policies[p]) for p in corpus.trained],
        encoding=cfg.encoding,
        thresholds=cal.thresholds,
        default_threshold=cal.default_threshold,
        data_sources=run.data_sources,
        recipe={
            **cfg.model_dump(mode="json", exclude={"encoding"}),
            "paraphrases": {k: [p.name for p in v] for k, v in corpus.paraphrases.items()},
            "held_out": corpus.holdout,
        },
        metrics={
            **calibration_metrics(cal, sets),
            "history": run.history,
            "best_step": run.best_step,
            "steps": run.steps,
            "stop_reason": run.stop_reason,
            "train_minutes": round(run.train_seconds / 60, 2),
            "total_minutes": round((time.monotonic() - started) / 60, 2),
        },
    )


def save_checkpoint(out: Path, model: Any, base: Path, meta: CheckpointMeta) -> None:
    """The Hugging Face folder (weights, config with the label names, the base's tokenizer) and the meta."""
    from transformers import AutoTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.id2label = dict(ID2LABEL)
    model.config.label2id = dict(LABEL2ID)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    meta.save(out)


def train(cfg: TrainConfig, corpus: Corpus | None = None) -> CheckpointMeta:
    """Train, calibrate and save a checkpoint; returns its meta."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning halves speed.
    # (Read when torch loads its OpenMP runtime, so it only helps if torch is not imported yet.)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForSequenceClassification

    started = time.monotonic()
    deadline = started + cfg.max_minutes * 60
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    base = base_model_dir(cfg.base)
    log.info("base encoder %s", base)
    corpus = corpus if corpus is not None else build_training_corpus(cfg)
    sets = evaluation_sets(cfg, corpus)
    log.info(
        "corpus: %d policies (%d trained, held out: %s), %d train examples, %d early-stopping val, "
        "%d calibration val, %d zero-shot",
        len(corpus.policies),
        len(corpus.trained),
        corpus.holdout,
        len(sets.train),
        len(sets.early_stop),
        len(sets.calibration),
        len(sets.zero_shot),
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=2, id2label=ID2LABEL, label2id=LABEL2ID, ignore_mismatched_sizes=True
    )
    model.train()
    encoder = encoder_from_config(Tokenizer.from_file(str(base / "tokenizer.json")), cfg.encoding)
    trainer = Trainer(cfg, model, encoder, base / "tokenizer.json", corpus, sets, started)
    run = trainer.run(deadline)
    cal = calibrate(cfg, model, encoder, sets, trainer.canonical)
    meta = checkpoint_meta(cfg, base, corpus, sets, run, cal, started)
    save_checkpoint(cfg.out, model, base, meta)
    log.info("saved %s in %.1f min", cfg.out, (time.monotonic() - started) / 60)
    return meta


def recalibrate(checkpoint: Path, data: Path | None = None, recipe_from: Path | None = None) -> CheckpointMeta:
    """Fit a checkpoint's thresholds again with today's calibration rule, on the rows its recipe never trained on
    (the same corpus, splits and evaluation sets, rebuilt from its recorded training recipe, or from
    ``recipe_from``'s for a merged checkpoint); the weights are untouched and the meta records the recalibration."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from tokenizers import Tokenizer
    from transformers import AutoModelForSequenceClassification

    checkpoint = Path(checkpoint)
    meta = CheckpointMeta.load(checkpoint)
    source = CheckpointMeta.load(Path(recipe_from)) if recipe_from is not None else meta
    if "kind" not in source.recipe or "holdout" not in source.recipe:
        raise DataError(
            f"{checkpoint}: its meta holds no training recipe (a merged checkpoint?); pass --recipe-from with one "
            "of the trained checkpoints it was merged from"
        )
    recipe = {k: v for k, v in source.recipe.items() if k in TrainConfig.model_fields and k != "encoding"}
    cfg = TrainConfig(**recipe, encoding=meta.encoding)
    if data is not None:
        cfg = cfg.model_copy(update={"data": data})
    corpus = build_training_corpus(cfg)
    sets = evaluation_sets(cfg, corpus)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    encoder = encoder_from_config(Tokenizer.from_file(str(checkpoint / "tokenizer.json")), meta.encoding)
    canonical = {name: corpus.policies[name].instruction_text() for name in corpus.policies}
    cal = calibrate(cfg, model, encoder, sets, canonical)
    previous = dict(meta.thresholds)
    meta = meta.model_copy(
        update={
            "thresholds": cal.thresholds,
            "default_threshold": cal.default_threshold,
            "metrics": {
                **meta.metrics,
                **calibration_metrics(cal, sets),
                "recalibrated": {"rule": "uniguard train calibrate", "previous_thresholds": previous},
            },
        }
    )
    meta.save(checkpoint)
    return meta


def training_speed(
    cfgs: Sequence[TrainConfig], steps: int, corpus: Corpus | None = None, warmup: int = 2
) -> list[dict[str, Any]]:
    """Examples per second of each recipe (CE + MLM + ALICE++ as configured, no evaluation; weights thrown away).

    The recipes' steps alternate (after ``warmup`` steps each), so a shared machine's load hits them alike; the
    rate is from the median step time. For ``uniguard bench --train``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForSequenceClassification

    torch.set_num_threads(cfgs[0].threads)
    corpus = corpus if corpus is not None else build_training_corpus(cfgs[0])
    runs: list[tuple[TrainConfig, Trainer, list[list[tuple[Window, Example]]], list[float]]] = []
    for cfg in cfgs:
        torch.manual_seed(cfg.seed)
        base = base_model_dir(cfg.base)
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=2, id2label=ID2LABEL, label2id=LABEL2ID, ignore_mismatched_sizes=True
        )
        model.train()
        encoder = encoder_from_config(Tokenizer.from_file(str(base / "tokenizer.json")), cfg.encoding)
        trainer = Trainer(cfg, model, encoder, base / "tokenizer.json", corpus, evaluation_sets(cfg, corpus), 0.0)
        batches = trainer.epoch_batches()
        if len(batches) < warmup + steps:
            raise DataError(f"only {len(batches)} batches in an epoch; lower the steps or raise --examples-per-epoch")
        runs.append((cfg, trainer, batches, []))
    for i in range(warmup + steps):
        for _cfg, trainer, batches, times in runs:
            t = time.perf_counter()
            trainer.step(i, batches[i])
            if i >= warmup:
                times.append(time.perf_counter() - t)
    out = []
    for cfg, _trainer, batches, times in runs:
        measured = batches[warmup : warmup + steps]
        texts = [len({w.policy for w, _ in b}) for b in measured] if cfg.mode == "prefix" else [0]
        out.append(
            {
                "mode": cfg.mode,
                "steps": steps,
                "batch_size": cfg.batch_size,
                "examples_per_s": cfg.batch_size / float(np.median(times)),
                "examples_per_s_mean": sum(len(b) for b in measured) / sum(times),
                "seconds": sum(times),
                "policy_texts_per_batch": float(np.mean(texts)),
            }
        )
    return out
