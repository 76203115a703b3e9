"""The model merging search (MMS) and single merges, end to end.

``run_search``: load the candidates, score each on the search split, keep the top-k, then per
iteration let a strategy propose a configuration, merge in memory, load the merged weights into one
reusable model and score the pre-tokenized search pairs; identical configurations are evaluated once.
Only the winner is written: a UniGuard checkpoint whose meta records the recipe and scores on the
search and the held-out split, beside ``trials.json``, ``report.json`` and ``search.png``.

``apply_merge``: one merge with given weights, method, hyper-parameters and subset.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from merging.evaluate import EvalResult, Objective
from merging.io import (
    Candidate,
    MergeError,
    default_base_dir,
    load_base,
    load_candidates,
    load_val_rows,
    offline,
    save_checkpoint,
    split_search_holdout,
)
from merging.methods import METHODS, MergeParams, merge_state_dicts, normalise_weights
from merging.search import Config, SearchSpace, make_strategy
from merging.subsets import SUBSETS, select
from policies.schema import DataSource, PolicyRef
from training.data import Row
from training.encoders import portable_name
from training.meta import CheckpointMeta

TRIALS_FILE = "trials.json"
REPORT_FILE = "report.json"
PLOT_FILE = "search.png"


class DataSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    val: list[Path] = Field(default_factory=list, description="JSONL files/folders; empty: shared data + seed")
    split: str = "val"
    cap_per_source: int | None = 150
    holdout_fraction: float = 0.3
    max_rows_per_policy: int | None = 150
    data_seed: int = 0


class SearchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    candidates: list[Path]
    out: Path
    data: DataSettings = Field(default_factory=DataSettings)
    iterations: int = Field(default=50, ge=1)
    top_k: int = Field(default=6, ge=1)
    strategies: list[str] = Field(default_factory=lambda: ["thompson"])
    methods: list[str] = Field(default_factory=lambda: list(METHODS))
    subsets: list[str] = Field(default_factory=lambda: list(SUBSETS))
    seed: int = 0
    base: Path | None = None
    anchor: Path | None = None
    batch_size: int = 64
    threads: int | None = None
    precision: Literal["fp32", "bf16"] = "bf16"
    name: str | None = None
    full_report: bool = False


class Trial(BaseModel):
    strategy: str
    iteration: int
    config: Config
    macro_f1: float
    f1: dict[str, float]
    thresholds: dict[str, float]
    seconds: float
    cached: bool = False


class CandidateScore(BaseModel):
    folder: str
    policies: list[str]
    own_macro_f1: float
    macro_f1: float
    f1: dict[str, float]
    thresholds: dict[str, float]
    holdout_macro_f1: float | None = None
    holdout_f1: dict[str, float] = Field(default_factory=dict)


log = logging.getLogger("uniguard.merge")


class Workspace:
    """Candidates' weights, the base, and one reusable model that merged weights are loaded into."""

    def __init__(
        self, candidates: Sequence[Candidate], base_dir: Path | None, threads: int | None = None, need_base: bool = True
    ) -> None:
        offline()
        import torch
        from transformers import AutoModelForSequenceClassification

        if threads:
            torch.set_num_threads(threads)
        self.candidates = list(candidates)
        ref = self.candidates[0].state
        self.base_dir = Path(base_dir) if base_dir else default_base_dir()
        self.base = load_base(self.base_dir, ref) if need_base else {}
        self.model = AutoModelForSequenceClassification.from_pretrained(self.candidates[0].folder).eval()
        self.float_keys = [k for k, v in ref.items() if v.is_floating_point()]
        self._deltas: dict[Path, dict[str, Any]] = {}

    def deltas(self, members: Sequence[Candidate]) -> list[dict[str, Any]]:
        """Task vectors θᵢ − θ_base, computed once per candidate (for the parameters the base has)."""
        for m in members:
            if m.folder not in self._deltas:
                self._deltas[m.folder] = {k: m.state[k] - b for k, b in self.base.items()}
        return [self._deltas[m.folder] for m in members]

    def merge(self, members: Sequence[Candidate], anchor: Candidate, config: Config) -> dict[str, Any]:
        needs_base = METHODS[config.method].needs_base
        return merge_state_dicts(
            config.method,
            [m.state for m in members],
            config.weights,
            select(config.subset, self.float_keys),
            anchor.state,
            self.base if needs_base else None,
            config.params,
            self.deltas(members) if needs_base else None,
        )

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state, strict=True)


def policy_refs(candidates: Sequence[Candidate], anchor: Candidate | None = None) -> dict[str, PolicyRef]:
    """Union of the candidates' policies (name → ref); the anchor's text wins when candidates disagree."""
    refs: dict[str, PolicyRef] = {}
    for c in ([anchor] if anchor else []) + list(candidates):
        for ref in c.meta.policies:
            if ref.name in refs and refs[ref.name].content_hash != ref.content_hash:
                log.info(f"policy {ref.name}: {c.folder} read a different text; using {refs[ref.name].content_hash}")
            refs.setdefault(ref.name, ref)
    return refs


def load_data(settings: DataSettings, policies: Sequence[str]) -> tuple[list[Row], list[Row]]:
    rows = load_val_rows(settings.val, settings.split, settings.cap_per_source, settings.data_seed)
    unknown = sorted({r.policy for r in rows} - set(policies))
    if unknown:
        log.info(f"ignoring validation rows of policies no candidate covers: {unknown}")
    rows = [r for r in rows if r.policy in policies]
    if not rows:
        raise MergeError(f"no validation rows for the candidates' policies {sorted(policies)}")
    return split_search_holdout(rows, settings.holdout_fraction, settings.max_rows_per_policy)


def merged_meta(
    name: str,
    members: Sequence[Candidate],
    anchor: Candidate,
    thresholds: dict[str, float],
    recipe: dict[str, Any],
    metrics: dict[str, Any],
) -> CheckpointMeta:
    refs = policy_refs(members, anchor)
    final: dict[str, float] = {}
    for policy in refs:
        if policy in thresholds:
            final[policy] = thresholds[policy]
        elif policy in anchor.meta.thresholds:
            final[policy] = anchor.meta.thresholds[policy]
        else:
            known = [m.meta.thresholds[policy] for m in members if policy in m.meta.thresholds]
            final[policy] = sum(known) / len(known) if known else anchor.meta.default_threshold
    sources: dict[tuple[str, str, str], DataSource] = {}
    for m in members:
        for ds in m.meta.data_sources:
            sources.setdefault((ds.source, ds.license, ds.policy), ds)
    return CheckpointMeta(
        kind="uniguard",
        name=name,
        base_model=anchor.meta.base_model,
        policies=list(refs.values()),
        encoding=anchor.meta.encoding,
        thresholds=final,
        default_threshold=anchor.meta.default_threshold,
        data_sources=list(sources.values()),
        recipe=recipe,
        metrics=metrics,
    )


def _encoder(anchor: Candidate, members: Sequence[Candidate]) -> Any:
    from tokenizers import Tokenizer

    from policies.instruction import encoder_from_config

    for m in members:
        if m.meta.encoding != anchor.meta.encoding:
            log.info(f"warning: {m.folder} was built with encoding {m.meta.encoding}; evaluating with the anchor's")
    tokenizer = Tokenizer.from_file(str(anchor.folder / "tokenizer.json"))
    return encoder_from_config(tokenizer, anchor.meta.encoding)


def _score_candidate(ws: Workspace, c: Candidate, search: Objective) -> CandidateScore:
    ws.load(c.state)
    res = search.evaluate()
    own = [p for p in c.policy_names if p in res.policies]
    return CandidateScore(
        folder=str(c.folder),
        policies=c.policy_names,
        own_macro_f1=res.macro_over(own),
        macro_f1=res.macro_f1,
        f1={p: s.f1 for p, s in res.policies.items()},
        thresholds={p: s.threshold for p, s in res.policies.items()},
    )


def select_top_k(scores: dict[str, CandidateScore], policies: Sequence[str], k: int) -> list[str]:
    """Top-k folders by macro-F1 over each candidate's own policies (ties: over all policies, then
    name); a policy none of them covers adds the candidate with the best F1 on it (so k may grow)."""
    ranked = sorted(scores, key=lambda f: (-scores[f].own_macro_f1, -scores[f].macro_f1, f))
    chosen = ranked[:k]
    for policy in policies:
        if any(policy in scores[f].policies for f in chosen):
            continue
        owners = [f for f in ranked if policy in scores[f].policies]
        if owners:
            chosen.append(max(owners, key=lambda f: scores[f].f1.get(policy, 0.0)))
    return chosen


@dataclass
class SearchContext:
    """Phase 1: the candidates in one workspace and the search/held-out objectives (pairs tokenized once)."""

    settings: SearchSettings
    candidates: list[Candidate]
    ws: Workspace
    search: Objective
    holdout: Objective | None

    @property
    def by_folder(self) -> dict[str, Candidate]:
        return {str(c.folder): c for c in self.candidates}


class Members(BaseModel):
    """Phase 2: every candidate's scores, the top-k members of the merge and the anchor (best single candidate)."""

    scores: dict[str, CandidateScore]
    chosen: list[str]
    anchor: str

    @property
    def best_single(self) -> float:
        return self.scores[self.anchor].macro_f1


class Trials(BaseModel):
    """Phase 3: each method's default merge and every strategy's trials."""

    defaults: list[Trial]
    trials: list[Trial]

    @property
    def winner(self) -> Trial:
        return max(self.defaults + self.trials, key=lambda t: t.macro_f1)


class Selection(BaseModel):
    """Phase 4: the best merge judged on the held-out split against the anchor; what the stage ships."""

    winner: Trial
    winner_holdout: EvalResult | None
    merge_wins: bool

    @property
    def selected(self) -> str:
        return "merge" if self.merge_wins else "best_candidate"


def prepare(settings: SearchSettings) -> SearchContext:
    for s in settings.strategies:
        make_strategy(s, SearchSpace(1))  # validate names before the slow part
    candidates = load_candidates(settings.candidates)
    need_base = any(METHODS[m].needs_base for m in settings.methods)
    ws = Workspace(candidates, settings.base, settings.threads, need_base)
    refs = policy_refs(candidates)
    search_rows, holdout_rows = load_data(settings.data, list(refs))
    encoder = _encoder(candidates[0], candidates)
    texts = {p: r.instruction_text for p, r in refs.items()}
    t0 = time.perf_counter()

    def objective(rows: list[Row]) -> Objective:
        return Objective(ws.model, encoder, rows, texts, settings.batch_size, settings.precision)

    search = objective(search_rows)
    holdout = objective(holdout_rows) if holdout_rows else None
    log.info(
        "%d search pairs (%d windows, %d tokens) and %d held-out pairs over %s, tokenized in %.1fs",
        len(search),
        search.n_windows,
        search.n_tokens,
        len(holdout) if holdout else 0,
        search.policies,
        time.perf_counter() - t0,
    )
    return SearchContext(settings, candidates, ws, search, holdout)


def choose_members(ctx: SearchContext) -> Members:
    """Score every candidate on the search split; keep the top-k; the anchor is the best of them (or --anchor)."""
    from tqdm import tqdm

    settings = ctx.settings
    scores = {str(c.folder): _score_candidate(ctx.ws, c, ctx.search) for c in tqdm(ctx.candidates, desc="candidates")}
    chosen = select_top_k(scores, ctx.search.policies, settings.top_k)
    if settings.anchor is not None:
        if str(settings.anchor) not in scores:
            raise MergeError(f"--anchor {settings.anchor} is not one of the candidates")
        if str(settings.anchor) not in chosen:
            chosen.append(str(settings.anchor))
        anchor = str(settings.anchor)
    else:
        anchor = max(chosen, key=lambda f: (scores[f].macro_f1, -chosen.index(f)))
    members = Members(scores=scores, chosen=chosen, anchor=anchor)
    log.info(
        "members: %s; anchor %s (search macro-F1 %.4f)",
        [Path(f).name for f in chosen],
        Path(anchor).name,
        members.best_single,
    )
    return members


class MergeEvaluator:
    """Merges the members with a config and scores the result; identical configs are evaluated once per split."""

    def __init__(self, ctx: SearchContext, members: Members) -> None:
        self.ctx = ctx
        self.members = [ctx.by_folder[f] for f in members.chosen]
        self.anchor = ctx.by_folder[members.anchor]
        self._search: dict[str, EvalResult] = {}
        self._holdout: dict[str, EvalResult] = {}

    def load(self, config: Config) -> None:
        self.ctx.ws.load(self.ctx.ws.merge(self.members, self.anchor, config))

    def trial(self, strategy: str, iteration: int, config: Config) -> Trial:
        t = time.perf_counter()
        key = config.key()
        cached = key in self._search
        if not cached:
            self.load(config)
            self._search[key] = self.ctx.search.evaluate()
        res = self._search[key]
        return Trial(
            strategy=strategy,
            iteration=iteration,
            config=config,
            macro_f1=res.macro_f1,
            f1={p: s.f1 for p, s in res.policies.items()},
            thresholds={p: s.threshold for p, s in res.policies.items()},
            seconds=time.perf_counter() - t,
            cached=cached,
        )

    def held_out(self, t: Trial) -> EvalResult:
        """The trial's merge on the held-out split at its search-split thresholds."""
        assert self.ctx.holdout is not None
        key = t.config.key()
        if key not in self._holdout:
            self.load(t.config)
            self._holdout[key] = self.ctx.holdout.evaluate(t.thresholds)
        return self._holdout[key]


def run_trials(ctx: SearchContext, members: Members, evaluator: MergeEvaluator) -> Trials:
    """Each method's default merge (uniform weights, default hyper-parameters, all parameters), then the strategies."""
    from tqdm import tqdm

    settings = ctx.settings
    n = len(members.chosen)
    uniform = [1.0 / n] * n
    defaults = [
        evaluator.trial("default", 0, Config(weights=uniform, method=m, params=MergeParams(seed=settings.seed)))
        for m in settings.methods
    ]
    space = SearchSpace(n, tuple(settings.methods), tuple(settings.subsets), seed=settings.seed)
    history = [members.scores[f].macro_f1 for f in members.chosen]
    trials: list[Trial] = []
    for si, name in enumerate(settings.strategies):
        strategy = make_strategy(name, space, settings.seed + si, history)
        bar = tqdm(range(1, settings.iterations + 1), desc=f"search[{name}]", unit="it")
        best = 0.0
        for i in bar:
            config = strategy.propose()
            tr = evaluator.trial(name, i, config)
            strategy.update(config, tr.macro_f1)
            trials.append(tr)
            best = max(best, tr.macro_f1)
            bar.set_postfix(best=f"{best:.4f}", last=f"{tr.macro_f1:.4f}", method=config.method)
    return Trials(defaults=defaults, trials=trials)


def held_out_score(ctx: SearchContext, members: Members, folder: str) -> None:
    """A candidate on the held-out split at its search-split thresholds (recorded in ``members.scores``)."""
    score = members.scores[folder]
    if ctx.holdout is None or score.holdout_macro_f1 is not None:
        return
    ctx.ws.load(ctx.by_folder[folder].state)
    res = ctx.holdout.evaluate(score.thresholds)
    score.holdout_macro_f1 = res.macro_f1
    score.holdout_f1 = {p: s.f1 for p, s in res.policies.items()}


def decide(ctx: SearchContext, members: Members, trials: Trials, evaluator: MergeEvaluator) -> Selection:
    """Ship the merge only if it beats the best single candidate where neither was chosen: on the held-out split
    (on the search split when there is none). Otherwise the stage passes the best candidate through."""
    winner = trials.winner
    win_holdout = evaluator.held_out(winner) if ctx.holdout else None
    held_out_score(ctx, members, members.anchor)
    if win_holdout is not None:
        merge_wins = win_holdout.macro_f1 > (members.scores[members.anchor].holdout_macro_f1 or 0.0)
    else:
        merge_wins = winner.macro_f1 > members.best_single
    if not merge_wins:
        log.info(
            "the best merge does not beat the best single candidate %s on the %s split: passing it through unchanged",
            Path(members.anchor).name,
            "held-out" if win_holdout else "search",
        )
    return Selection(winner=winner, winner_holdout=win_holdout, merge_wins=merge_wins)


def _merge_record(sel: Selection, members: Members, ctx: SearchContext) -> dict[str, Any]:
    """The best merge of the search: its recipe and scores."""
    w = sel.winner
    return {
        "candidates": members.chosen,
        "weights": w.config.weights,
        "method": w.config.method,
        "params": w.config.relevant_params(),
        "seed": ctx.settings.seed,
        "subset": w.config.subset,
        "anchor": members.anchor,
        "base": portable_name(ctx.ws.base_dir),
        "strategy": w.strategy,
        "iteration": w.iteration,
        "scores": {
            "search_macro_f1": w.macro_f1,
            "holdout_macro_f1": sel.winner_holdout.macro_f1 if sel.winner_holdout else None,
            "best_candidate_search_macro_f1": members.best_single,
        },
    }


def shipped_meta(ctx: SearchContext, members: Members, sel: Selection) -> CheckpointMeta:
    """The meta of what the stage ships, honestly: the merge with its recipe when it won; otherwise the candidate's
    own meta (kind, policies, thresholds, training recipe) with the search and its losing best merge under
    ``recipe.merge_search``."""
    settings = ctx.settings
    out = Path(settings.out)
    name = settings.name or out.name
    search = {
        "strategies": settings.strategies,
        "iterations": settings.iterations,
        "top_k": settings.top_k,
        "methods": settings.methods,
        "subsets": settings.subsets,
        "data": settings.data.model_dump(mode="json"),
        "precision": settings.precision,
        "search_rows": len(ctx.search),
        "holdout_rows": len(ctx.holdout) if ctx.holdout else 0,
        "report": REPORT_FILE,
    }
    merge = _merge_record(sel, members, ctx)
    anchor = ctx.by_folder[members.anchor]
    if sel.merge_wins:
        w, wh = sel.winner, sel.winner_holdout
        metrics = {
            "search": {"macro_f1": w.macro_f1, "f1": w.f1},
            "holdout": {"macro_f1": wh.macro_f1, "f1": {p: s.f1 for p, s in wh.policies.items()}} if wh else None,
        }
        recipe = {"selected": "merge", **merge, "search": search}
        return merged_meta(name, [ctx.by_folder[f] for f in members.chosen], anchor, w.thresholds, recipe, metrics)
    score = members.scores[members.anchor]
    recipe = {
        **anchor.meta.recipe,
        "selected": "best_candidate",
        "candidate": members.anchor,
        "merge_search": {**search, "best_merge": merge},
    }
    metrics = {
        **anchor.meta.metrics,
        "search": {"macro_f1": score.macro_f1, "f1": score.f1},
        "holdout": {"macro_f1": score.holdout_macro_f1, "f1": score.holdout_f1}
        if score.holdout_macro_f1 is not None
        else None,
    }
    return anchor.meta.model_copy(update={"name": name, "recipe": recipe, "metrics": metrics})


def ablation(ctx: SearchContext, members: Members, trials: Trials, evaluator: MergeEvaluator) -> dict[str, Any]:
    """With ``full_report``: held-out scores of every member and of each method's default and best merge."""
    if ctx.holdout is None or not ctx.settings.full_report:
        return {}
    for f in members.chosen:
        held_out_score(ctx, members, f)
    per_method: dict[str, dict[str, Any]] = {}
    for d in trials.defaults:
        tried = [t for t in trials.trials if t.config.method == d.config.method]
        best_m = max(tried, key=lambda t: t.macro_f1) if tried else None
        entry: dict[str, Any] = {"default_search": d.macro_f1, "search_trials": len(tried)}
        for label, picked in (("default", d), ("best", best_m)):
            if picked is not None:
                entry[f"{label}_search"] = picked.macro_f1
                entry[f"{label}_holdout"] = evaluator.held_out(picked).macro_f1
        per_method[d.config.method] = entry
    return per_method


def write_report(
    ctx: SearchContext,
    members: Members,
    trials: Trials,
    sel: Selection,
    per_method: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    from merging.plots import plot_search

    settings = ctx.settings
    out = Path(settings.out)
    curves = {s: [t.macro_f1 for t in trials.trials if t.strategy == s] for s in settings.strategies}
    plot_search(curves, out / PLOT_FILE, members.best_single, {d.config.method: d.macro_f1 for d in trials.defaults})
    evaluated = [t for t in trials.defaults + trials.trials if not t.cached]
    anchor = members.scores[members.anchor]
    candidates = {f: s.model_dump() for f, s in members.scores.items()}
    report = {
        "out": str(out),
        "members": members.chosen,
        "anchor": members.anchor,
        "winner": sel.winner.model_dump(mode="json"),
        "winner_holdout": sel.winner_holdout.model_dump() if sel.winner_holdout else None,
        "best_single_candidate": {
            "folder": members.anchor,
            "search_macro_f1": members.best_single,
            "holdout_macro_f1": anchor.holdout_macro_f1,
            "holdout_f1": anchor.holdout_f1,
        },
        "selected": sel.selected,
        "merge_beats_best_candidate_on_holdout": sel.merge_wins if sel.winner_holdout else None,
        "per_method": per_method,
        "candidates": candidates,
        "timing": {
            "total_seconds": seconds,
            "evaluations": len(evaluated),
            "cache_hits": len(trials.defaults) + len(trials.trials) - len(evaluated),
            "mean_seconds_per_evaluation": sum(t.seconds for t in evaluated) / max(len(evaluated), 1),
        },
    }
    trials_doc = {
        "candidates": candidates,
        "members": members.chosen,
        "anchor": members.anchor,
        "defaults": [t.model_dump(mode="json") for t in trials.defaults],
        "trials": [t.model_dump(mode="json") for t in trials.trials],
    }
    (out / TRIALS_FILE).write_text(json.dumps(trials_doc, indent=2), encoding="utf-8")
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def run_search(settings: SearchSettings) -> dict[str, Any]:
    """The model merging search; returns the report (also written to ``out/report.json``)."""
    t_start = time.perf_counter()
    ctx = prepare(settings)
    members = choose_members(ctx)
    evaluator = MergeEvaluator(ctx, members)
    trials = run_trials(ctx, members, evaluator)
    sel = decide(ctx, members, trials, evaluator)
    meta = shipped_meta(ctx, members, sel)
    anchor = ctx.by_folder[members.anchor]
    if sel.merge_wins:
        evaluator.load(sel.winner.config)
    else:
        ctx.ws.load(anchor.state)
    save_checkpoint(Path(settings.out), ctx.ws.model, anchor.folder, meta)
    per_method = ablation(ctx, members, trials, evaluator)
    report = write_report(ctx, members, trials, sel, per_method, time.perf_counter() - t_start)
    w = sel.winner
    log.info(
        "winner %s/%s (%s #%d): search %.4f, holdout %.4f; best single candidate %s holdout %s; shipped: %s; "
        "%.0fs total -> %s",
        w.config.method,
        w.config.subset,
        w.strategy,
        w.iteration,
        w.macro_f1,
        sel.winner_holdout.macro_f1 if sel.winner_holdout else float("nan"),
        Path(members.anchor).name,
        members.scores[members.anchor].holdout_macro_f1,
        sel.selected,
        report["timing"]["total_seconds"],
        settings.out,
    )
    return report


class ApplySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    candidates: list[Path]
    out: Path
    method: str
    weights: list[float] | None = None
    subset: str = "all"
    params: MergeParams = Field(default_factory=MergeParams)
    base: Path | None = None
    anchor: Path | None = None
    data: DataSettings | None = None
    batch_size: int = 64
    threads: int | None = None
    name: str | None = None


def apply_merge(settings: ApplySettings) -> CheckpointMeta:
    """One merge written as a UniGuard checkpoint. With data, thresholds are calibrated on all its rows
    (holdout fraction ignored); without, each policy keeps the anchor's threshold (else the members' mean)."""
    if settings.method not in METHODS:
        raise MergeError(f"unknown merge method {settings.method!r}; choose one of {', '.join(METHODS)}")
    candidates = load_candidates(settings.candidates)
    weights = settings.weights or [1.0] * len(candidates)
    if len(weights) != len(candidates):
        raise MergeError(f"{len(weights)} weights for {len(candidates)} candidates; give one weight per candidate")
    weights = normalise_weights(weights)
    anchor = candidates[0]
    if settings.anchor is not None:
        matches = [c for c in candidates if c.folder == Path(settings.anchor)]
        if not matches:
            raise MergeError(f"--anchor {settings.anchor} is not one of the candidates")
        anchor = matches[0]
    ws = Workspace(candidates, settings.base, settings.threads, METHODS[settings.method].needs_base)
    config = Config(weights=weights, method=settings.method, subset=settings.subset, params=settings.params)
    ws.load(ws.merge(candidates, anchor, config))
    thresholds: dict[str, float] = {}
    metrics: dict[str, Any] = {}
    if settings.data is not None:
        refs = policy_refs(candidates, anchor)
        data = settings.data.model_copy(update={"holdout_fraction": 0.0})
        rows, _ = load_data(data, list(refs))
        objective = Objective(
            ws.model,
            _encoder(anchor, candidates),
            rows,
            {p: r.instruction_text for p, r in refs.items()},
            settings.batch_size,
        )
        res = objective.evaluate()
        thresholds = {p: s.threshold for p, s in res.policies.items()}
        f1 = {p: s.f1 for p, s in res.policies.items()}
        metrics = {"val": {"macro_f1": res.macro_f1, "f1": f1, "rows": len(rows)}}
        log.info(f"validation macro-F1 {res.macro_f1:.4f} over {len(rows)} rows")
    recipe = {
        "candidates": [str(c.folder) for c in candidates],
        "weights": weights,
        "method": settings.method,
        "params": config.relevant_params(),
        "seed": settings.params.seed,
        "subset": settings.subset,
        "anchor": str(anchor.folder),
        "base": portable_name(ws.base_dir) if ws.base else None,
        "strategy": "manual",
    }
    out = Path(settings.out)
    meta = merged_meta(settings.name or out.name, candidates, anchor, thresholds, recipe, metrics)
    save_checkpoint(out, ws.model, anchor.folder, meta)
    log.info(f"{settings.method} merge of {len(candidates)} models → {out}")
    return meta
