"""TaskGuard and MultiTaskGuard training: CE + λ_mlm·MLM + λ_adv·ALICE++ on instruction inputs.

Every input is built with ``policies.instruction`` exactly as the service builds it. The MLM
objective reads the prompt (and, when the seed row has one, its rationale) on its own; the
classification head only ever sees (policy, prompt) windows.
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from policies.instruction import EncodingConfig, InstructionEncoder, Window, encoder_from_config
from policies.labels import ID2LABEL, LABEL2ID
from policies.schema import DataSource, Policy, PolicyRef
from training.corpus import (
    DEFAULT_HOLDOUT,
    DEFAULT_POLICIES,
    Corpus,
    Example,
    build_corpus,
    cap_examples,
    load_paraphrases,
    load_policies,
    sample_epoch,
)
from training.data import DataError, load_all
from training.meta import CheckpointMeta
from training.metrics import BinaryMetrics, binary_metrics, calibrate_threshold, macro
from training.predict import pad_windows, pair_windows, score_windows


class TrainConfig(BaseModel):
    """Every knob of a training run (recorded in the checkpoint's meta as the recipe)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["taskguard", "multitask"] = "multitask"
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
    lr: float = 8e-5
    warmup: float = 0.06
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
    eval_max_chars: int = 4000
    threads: int = 2
    bf16: bool = False  # bfloat16 autocast: oneDNN re-JITs kernels for every new shape on CPU (slow)
    pad_multiple: int = 16  # pad batches to a multiple of this length: few distinct shapes
    encoding: EncodingConfig = Field(default_factory=EncodingConfig)


def base_model_dir(base: Path | None) -> Path:
    """--base: a Hugging Face folder or a named base encoder (training/encoders.py); None is MiniLM."""
    from training.encoders import resolve_base

    return resolve_base(base)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


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


def pad_to_multiple(inputs: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    """Right-pad a padded batch further so its length is a multiple of ``multiple``."""
    width = inputs["input_ids"].shape[1]
    extra = (-width) % multiple if multiple > 1 else 0
    if not extra:
        return inputs
    return {k: np.pad(v, ((0, 0), (0, extra))) for k, v in inputs.items()}


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
    import torch

    if not examples:
        return np.zeros(0)
    pairs = [(policy_texts[e.policy], e.text[:max_chars] if max_chars else e.text) for e in examples]

    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits
        return torch.softmax(logits.float(), dim=-1)[:, 1].numpy()

    was_training = model.training
    model.eval()
    try:
        scores = score_windows(pair_windows(encoder, pairs), run, batch_size)
    finally:
        model.train(was_training)
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


# --- training -----------------------------------------------------------------------------------


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
        rows, policies, load_paraphrases(), holdout=cfg.holdout, seed=cfg.seed, split_seed=cfg.split_seed
    )


def _capped(examples: Sequence[Example], cap: int, seed: int, limits: tuple[int, int]) -> list[Example]:
    """Capped evaluation set: more rows for the default policies than for derived/custom ones."""
    dflt = [e for e in examples if e.policy in DEFAULT_POLICIES]
    other = [e for e in examples if e.policy not in DEFAULT_POLICIES]
    return cap_examples(dflt, cap, seed, limits[0]) + cap_examples(other, cap, seed, limits[1])


def train(cfg: TrainConfig, corpus: Corpus | None = None) -> CheckpointMeta:
    """Train, calibrate and save a checkpoint; returns its meta."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning halves speed.
    # (Read when torch loads its OpenMP runtime, so it only helps if torch is not imported yet.)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    import torch.nn.functional as F
    from tokenizers import Tokenizer
    from tqdm import tqdm
    from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    from training.alice import alice_loss, perturbable_modules

    t0 = time.monotonic()
    deadline = t0 + cfg.max_minutes * 60
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    rng = random.Random(cfg.seed)

    base = base_model_dir(cfg.base)
    log(f"base encoder {base}")
    if corpus is None:
        corpus = build_training_corpus(cfg)
    trained = corpus.trained
    if not trained:
        raise DataError("no policy has both safe and unsafe training rows; check --data and the seed files")
    train_ex = corpus.select("train", trained)
    val_all = corpus.select("val", trained)
    es_val = _capped(val_all, cfg.es_cap, cfg.seed, cfg.es_max_per_policy)
    final_val = _capped(val_all, cfg.val_cap, cfg.seed, cfg.val_max_per_policy)
    zs_ex = _capped(
        [e for e in corpus.examples if e.policy in corpus.holdout and (e.split != "train" or e.kind != "cross")],
        cfg.val_cap,
        cfg.seed,
        cfg.val_max_per_policy,
    )
    log(
        f"corpus: {len(corpus.policies)} policies ({len(trained)} trained, held out: {corpus.holdout}), "
        f"{len(train_ex)} train examples, {len(es_val)} early-stopping val, {len(final_val)} calibration val, "
        f"{len(zs_ex)} zero-shot"
    )

    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=2, id2label=ID2LABEL, label2id=LABEL2ID, ignore_mismatched_sizes=True
    )
    model.train()
    tokenizer_file = base / "tokenizer.json"
    encoder = encoder_from_config(Tokenizer.from_file(str(tokenizer_file)), cfg.encoding)
    builder = WindowBuilder(encoder)
    canonical = {name: corpus.policies[name].instruction_text() for name in corpus.policies}
    variants = {name: corpus.policy_texts(name) for name in corpus.policies}
    n_perturb = len(perturbable_modules(model)) if cfg.adv_weight > 0 else 0
    mlm = MLM(model, tokenizer_file, cfg.mlm_prob, cfg.seed) if cfg.mlm_weight > 0 else None

    params = list(model.parameters()) + (mlm.parameters() if mlm else [])
    no_decay = ("bias", "LayerNorm.weight", "layer_norm", "norm.weight")
    named = list(model.named_parameters()) + (
        [(f"mlm.{n}", p) for n, p in mlm.head.named_parameters() if "decoder.weight" not in n] if mlm else []
    )
    groups = [
        {"params": [p for n, p in named if not any(k in n for k in no_decay)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in named if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    steps_per_epoch = math.ceil(min(cfg.examples_per_epoch, max(len(train_ex), 1)) / cfg.batch_size)
    total_steps = max(1, steps_per_epoch * cfg.epochs)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup * total_steps), total_steps)

    best: dict[str, Any] = {"score": -1.0, "state": None, "step": 0}
    history: list[dict[str, Any]] = []
    bad_evals = 0
    eval_rate = 0.0  # pairs per second, measured on the first evaluation

    def evaluate(step: int) -> float:
        nonlocal eval_rate, bad_evals
        t = time.monotonic()
        scores = score_examples(model, encoder, es_val, canonical, cfg.eval_max_chars)
        eval_rate = len(es_val) / max(time.monotonic() - t, 1e-6)
        metrics = per_policy_metrics(es_val, scores)
        value = macro([m.f1 for m in metrics.values()])
        dflt = macro([m.f1 for p, m in metrics.items() if p in DEFAULT_POLICIES])
        history.append({"step": step, "macro_f1": value, "default_macro_f1": dflt, "seconds": time.monotonic() - t0})
        log(f"step {step}: val macro-F1 {value:.4f} (defaults {dflt:.4f}); {eval_rate:.1f} pairs/s")
        if value > best["score"]:
            best.update(score=value, state=copy.deepcopy(model.state_dict()), step=step)
            bad_evals = 0
        else:
            bad_evals += 1
        return value

    def reserve_seconds() -> float:
        rate = eval_rate or 30.0
        return (len(final_val) + len(zs_ex)) / rate + 30.0

    step = 0
    stop = ""
    counts: Counter[tuple[str, str, str]] = Counter()
    log(f"training: {cfg.epochs} epochs x {steps_per_epoch} steps, batch {cfg.batch_size}")
    for epoch in range(cfg.epochs):
        sample = sample_epoch(train_ex, min(cfg.examples_per_epoch, len(train_ex)), rng)
        builder.prepare([e.text for e in sample])
        items: list[tuple[Window, Example]] = []
        for e in sample:
            texts = variants[e.policy]
            text = texts[0] if len(texts) == 1 or rng.random() >= cfg.paraphrase_prob else rng.choice(texts[1:])
            items.append((builder.window(text, e), e))
            counts[(e.source, e.license, e.policy)] += 1
        batches = bucketed_batches(items, lambda it: len(it[0]), cfg.batch_size, rng)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", mininterval=10, dynamic_ncols=True)
        for batch in bar:
            inputs = {
                k: torch.from_numpy(v)
                for k, v in pad_to_multiple(pad_windows([w for w, _ in batch]), cfg.pad_multiple).items()
            }
            labels = torch.tensor([e.label for _, e in batch])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = model(**inputs).logits
                loss = F.cross_entropy(logits.float(), labels)
                parts = {"ce": loss.item()}
                if n_perturb and step % cfg.adv_every == 0:
                    adv = alice_loss(
                        model,
                        inputs,
                        labels,
                        logits,
                        layer=rng.randrange(n_perturb),
                        eps=cfg.adv_eps,
                        sigma=cfg.adv_sigma,
                        alpha=cfg.adv_alpha,
                    )
                    loss = loss + cfg.adv_weight * adv.loss
                    parts["adv"] = adv.loss.item()
                if mlm is not None and step % cfg.mlm_every == 0:
                    mlm_loss = mlm.loss([e for _, e in batch])
                    loss = loss + cfg.mlm_weight * mlm_loss
                    parts["mlm"] = mlm_loss.item()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.set_postfix({k: f"{v:.3f}" for k, v in parts.items()}, refresh=False)
            if step % cfg.eval_every == 0:
                evaluate(step)
                if bad_evals >= cfg.patience:
                    stop = f"early stop: no val improvement in {cfg.patience} evaluations"
                    break
            if time.monotonic() > deadline - reserve_seconds():
                stop = f"time budget of {cfg.max_minutes} min reached"
                break
        bar.close()
        if stop:
            break
    if not history or history[-1]["step"] != step:
        evaluate(step)
    log(stop or f"finished {cfg.epochs} epochs ({step} steps)")
    model.load_state_dict(best["state"])
    train_seconds = time.monotonic() - t0

    # Calibration on validation, zero-shot on held-out policies.
    log(f"calibrating thresholds on {len(final_val)} validation pairs (best step {best['step']})")
    val_scores = score_examples(model, encoder, final_val, canonical)
    val_metrics = per_policy_metrics(final_val, val_scores)
    thresholds = {p: m.threshold for p, m in val_metrics.items()}
    pooled = [i for i, e in enumerate(final_val) if e.policy not in DEFAULT_POLICIES]
    if not pooled:
        pooled = list(range(len(final_val)))
    default_threshold = calibrate_threshold(val_scores[pooled], np.array([final_val[i].label for i in pooled]))
    zs_metrics: dict[str, BinaryMetrics] = {}
    if zs_ex:
        zs_scores = score_examples(model, encoder, zs_ex, canonical)
        zs_metrics = per_policy_metrics(zs_ex, zs_scores, thresholds={}, default_threshold=default_threshold)
    meta = save_checkpoint(
        cfg,
        model,
        base,
        corpus,
        counts,
        thresholds,
        default_threshold,
        val_metrics,
        zs_metrics,
        source_macro(final_val, val_scores, thresholds),
        history,
        best["step"],
        step,
        train_seconds,
        stop,
        t0,
    )
    log(f"saved {cfg.out} in {(time.monotonic() - t0) / 60:.1f} min")
    return meta


def save_checkpoint(
    cfg: TrainConfig,
    model: Any,
    base: Path,
    corpus: Corpus,
    counts: Counter[tuple[str, str, str]],
    thresholds: dict[str, float],
    default_threshold: float,
    val_metrics: dict[str, BinaryMetrics],
    zs_metrics: dict[str, BinaryMetrics],
    val_source_macro: dict[str, float],
    history: list[dict[str, Any]],
    best_step: int,
    steps: int,
    train_seconds: float,
    stop: str,
    started: float,
) -> CheckpointMeta:
    from transformers import AutoTokenizer

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.id2label = dict(ID2LABEL)
    model.config.label2id = dict(LABEL2ID)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    trained = [corpus.policies[p] for p in corpus.trained]
    name = cfg.policy if cfg.kind == "taskguard" and cfg.policy else "multitask"

    def dump(metrics: dict[str, BinaryMetrics]) -> dict[str, Any]:
        return {p: m.model_dump() for p, m in metrics.items()}

    meta = CheckpointMeta(
        kind=cfg.kind,
        name=f"{cfg.kind}-{name}" if cfg.kind == "taskguard" else "multitask",
        base_model=str(base),
        policies=[PolicyRef.of(p) for p in trained],
        encoding=cfg.encoding,
        thresholds=thresholds,
        default_threshold=default_threshold,
        data_sources=[DataSource(source=s, license=lic, policy=p, rows=n) for (s, lic, p), n in sorted(counts.items())],
        recipe={
            **cfg.model_dump(mode="json", exclude={"encoding"}),
            "paraphrases": {k: [p.name for p in v] for k, v in corpus.paraphrases.items()},
            "held_out": corpus.holdout,
        },
        metrics={
            "val": dump(val_metrics),
            "val_macro_f1": macro([m.f1 for m in val_metrics.values()]),
            "val_default_macro_f1": macro([m.f1 for p, m in val_metrics.items() if p in DEFAULT_POLICIES]),
            "val_source_macro_accuracy": val_source_macro,
            "zero_shot": dump(zs_metrics),
            "zero_shot_macro_f1": macro([m.f1 for m in zs_metrics.values()]),
            "history": history,
            "best_step": best_step,
            "steps": steps,
            "stop_reason": stop or "completed",
            "train_minutes": round(train_seconds / 60, 2),
            "total_minutes": round((time.monotonic() - started) / 60, 2),
        },
    )
    meta.save(out)
    return meta


def policy_of(name: str, policy_dirs: Sequence[Path] = ()) -> Policy:
    policies = load_policies(policy_dirs)
    if name not in policies:
        raise DataError(f"unknown policy {name!r}; known: {', '.join(sorted(policies))}")
    return policies[name]
