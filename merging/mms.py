"""The model merging search (MMS) and single merges, end to end.

``run_search``: load the candidates, score each on the search split, keep the top-k, then per
iteration let a strategy propose a configuration, merge in memory, load the merged weights into one
reusable model and score the pre-tokenized search pairs; identical configurations are evaluated once.
Only the winner is written: a UniGuard checkpoint whose meta records the recipe and scores on the
search and the held-out split, beside ``trials.json``, ``report.json`` and ``search.png``.

``apply_merge``: one merge with given weights, method, hyper-parameters and subset.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
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


def _log(msg: str) -> None:
    print(f"[merge] {msg}", flush=True)


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
                _log(f"policy {ref.name}: {c.folder} read a different text; using {refs[ref.name].content_hash}")
            refs.setdefault(ref.name, ref)
    return refs


def load_data(settings: DataSettings, policies: Sequence[str]) -> tuple[list[Row], list[Row]]:
    rows = load_val_rows(settings.val, settings.split, settings.cap_per_source, settings.data_seed)
    unknown = sorted({r.policy for r in rows} - set(policies))
    if unknown:
        _log(f"ignoring validation rows of policies no candidate covers: {unknown}")
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
            _log(f"warning: {m.folder} was built with encoding {m.meta.encoding}; evaluating with the anchor's")
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


def run_search(settings: SearchSettings) -> dict[str, Any]:
    """The model merging search; returns the report (also written to ``out/report.json``)."""
    from tqdm import tqdm

    from merging.plots import plot_search

    t_start = time.perf_counter()
    for s in settings.strategies:
        make_strategy(s, SearchSpace(1))  # validate names before the slow part
    candidates = load_candidates(settings.candidates)
    need_base = any(METHODS[m].needs_base for m in settings.methods)
    ws = Workspace(candidates, settings.base, settings.threads, need_base)
    refs = policy_refs(candidates)
    search_rows, holdout_rows = load_data(settings.data, list(refs))
    anchor0 = candidates[0]
    encoder = _encoder(anchor0, candidates)
    texts = {p: r.instruction_text for p, r in refs.items()}
    t0 = time.perf_counter()
    search = Objective(ws.model, encoder, search_rows, texts, settings.batch_size, settings.precision)
    holdout = (
        Objective(ws.model, encoder, holdout_rows, texts, settings.batch_size, settings.precision)
        if holdout_rows
        else None
    )
    _log(
        f"{len(search)} search pairs ({search.n_windows} windows, {search.n_tokens} tokens) and "
        f"{len(holdout) if holdout else 0} held-out pairs over {search.policies}, tokenized in "
        f"{time.perf_counter() - t0:.1f}s"
    )

    # 1. Candidates: score on the search split, keep the top-k, pick the anchor.
    scores: dict[str, CandidateScore] = {}
    for c in tqdm(candidates, desc="candidates", unit="model"):
        scores[str(c.folder)] = _score_candidate(ws, c, search)
    by_folder = {str(c.folder): c for c in candidates}
    chosen = select_top_k(scores, search.policies, settings.top_k)
    if settings.anchor is not None:
        if str(settings.anchor) not in by_folder:
            raise MergeError(f"--anchor {settings.anchor} is not one of the candidates")
        if str(settings.anchor) not in chosen:
            chosen.append(str(settings.anchor))
        anchor = by_folder[str(settings.anchor)]
    else:
        anchor = by_folder[max(chosen, key=lambda f: (scores[f].macro_f1, -chosen.index(f)))]
    members = [by_folder[f] for f in chosen]
    best_single = scores[str(anchor.folder)].macro_f1
    _log(f"members: {[m.name for m in members]}; anchor {anchor.name} (search macro-F1 {best_single:.4f})")

    # 2. Default merges (uniform weights, default hyper-parameters, all parameters) and the search.
    space = SearchSpace(len(members), tuple(settings.methods), tuple(settings.subsets), seed=settings.seed)
    cache: dict[str, EvalResult] = {}

    def evaluate(config: Config) -> tuple[EvalResult, bool]:
        key = config.key()
        if key in cache:
            return cache[key], True
        ws.load(ws.merge(members, anchor, config))
        cache[key] = search.evaluate()
        return cache[key], False

    def trial(strategy: str, iteration: int, config: Config) -> Trial:
        t = time.perf_counter()
        res, cached = evaluate(config)
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

    uniform = [1.0 / len(members)] * len(members)
    defaults = [
        trial("default", 0, Config(weights=uniform, method=m, subset="all", params=MergeParams(seed=settings.seed)))
        for m in settings.methods
    ]
    trials: list[Trial] = []
    history = [scores[f].macro_f1 for f in chosen]
    for si, name in enumerate(settings.strategies):
        strategy = make_strategy(name, space, settings.seed + si, history)
        bar = tqdm(range(1, settings.iterations + 1), desc=f"search[{name}]", unit="it")
        best = 0.0
        for i in bar:
            config = strategy.propose()
            tr = trial(name, i, config)
            strategy.update(config, tr.macro_f1)
            trials.append(tr)
            best = max(best, tr.macro_f1)
            bar.set_postfix(best=f"{best:.4f}", last=f"{tr.macro_f1:.4f}", method=config.method)

    # 3. The winner, judged again on the held-out split with thresholds calibrated on the search split.
    winner = max(defaults + trials, key=lambda t: t.macro_f1)
    holdout_cache: dict[str, EvalResult] = {}

    def held_out(t: Trial) -> EvalResult:
        """The trial's merge on the held-out split at its search-split thresholds."""
        assert holdout is not None
        key = t.config.key()
        if key not in holdout_cache:
            ws.load(ws.merge(members, anchor, t.config))
            holdout_cache[key] = holdout.evaluate(t.thresholds)
        return holdout_cache[key]

    win_holdout = held_out(winner) if holdout else None
    anchor_key = str(anchor.folder)
    if holdout is not None:
        ws.load(anchor.state)
        res = holdout.evaluate(scores[anchor_key].thresholds)
        scores[anchor_key].holdout_macro_f1 = res.macro_f1
        scores[anchor_key].holdout_f1 = {p: s.f1 for p, s in res.policies.items()}
    # 3b. Ship the merge only if it beats the best single candidate where neither was chosen: on the held-out
    #     split (on the search split when there is none). Otherwise the stage passes the best candidate through.
    if win_holdout is not None:
        merge_wins = win_holdout.macro_f1 > (scores[anchor_key].holdout_macro_f1 or 0.0)
    else:
        merge_wins = winner.macro_f1 > best_single
    if merge_wins:
        ws.load(ws.merge(members, anchor, winner.config))
    else:
        ws.load(anchor.state)
        _log(
            f"the best merge does not beat the best single candidate {anchor.name} on the "
            f"{'held-out' if win_holdout else 'search'} split: passing {anchor.name} through unchanged"
        )
    out = Path(settings.out)
    name = settings.name or out.name
    params = {k: v for k, v in winner.config.relevant_params().items()}
    recipe = {
        "selected": "merge" if merge_wins else "best_candidate",
        "candidates": [str(m.folder) for m in members],
        "weights": winner.config.weights,
        "method": winner.config.method,
        "params": params,
        "seed": settings.seed,
        "subset": winner.config.subset,
        "anchor": str(anchor.folder),
        "base": str(ws.base_dir),
        "strategy": winner.strategy,
        "iteration": winner.iteration,
        "search": {
            "strategies": settings.strategies,
            "iterations": settings.iterations,
            "top_k": settings.top_k,
            "methods": settings.methods,
            "subsets": settings.subsets,
            "data": settings.data.model_dump(mode="json"),
            "precision": settings.precision,
            "search_rows": len(search),
            "holdout_rows": len(holdout) if holdout else 0,
        },
        "scores": {
            "search_macro_f1": winner.macro_f1,
            "holdout_macro_f1": win_holdout.macro_f1 if win_holdout else None,
            "best_candidate_search_macro_f1": best_single,
        },
    }
    metrics = {
        "search": {"macro_f1": winner.macro_f1, "f1": winner.f1},
        "holdout": {"macro_f1": win_holdout.macro_f1, "f1": {p: s.f1 for p, s in win_holdout.policies.items()}}
        if win_holdout
        else None,
    }
    if not merge_wins:  # the candidate as it is, with the thresholds calibrated at training time
        metrics["best_candidate_holdout"] = {
            "macro_f1": scores[anchor_key].holdout_macro_f1,
            "f1": scores[anchor_key].holdout_f1,
        }
    meta = merged_meta(name, members, anchor, winner.thresholds if merge_wins else {}, recipe, metrics)
    save_checkpoint(out, ws.model, anchor.folder, meta)

    # 4. With full_report: held-out scores of the other members and of each method's default and best merge
    #    (the ablation; the anchor's were computed for the selection above).
    per_method: dict[str, dict[str, Any]] = {}
    if holdout is not None:
        for f in chosen if settings.full_report else []:
            if scores[f].holdout_macro_f1 is not None:
                continue
            ws.load(by_folder[f].state)
            res = holdout.evaluate(scores[f].thresholds)
            scores[f].holdout_macro_f1 = res.macro_f1
            scores[f].holdout_f1 = {p: s.f1 for p, s in res.policies.items()}
        if settings.full_report:
            for d in defaults:
                tried = [t for t in trials if t.config.method == d.config.method]
                best_m = max(tried, key=lambda t: t.macro_f1) if tried else None
                entry: dict[str, Any] = {"default_search": d.macro_f1, "search_trials": len(tried)}
                for label, picked in (("default", d), ("best", best_m)):
                    if picked is None:
                        continue
                    entry[f"{label}_search"] = picked.macro_f1
                    entry[f"{label}_holdout"] = held_out(picked).macro_f1
                per_method[d.config.method] = entry

    curves = {s: [t.macro_f1 for t in trials if t.strategy == s] for s in settings.strategies}
    plot_search(curves, out / PLOT_FILE, best_single, {d.config.method: d.macro_f1 for d in defaults})
    evaluated = [t for t in defaults + trials if not t.cached]
    total_seconds = time.perf_counter() - t_start
    report = {
        "out": str(out),
        "members": chosen,
        "anchor": str(anchor.folder),
        "winner": winner.model_dump(mode="json"),
        "winner_holdout": win_holdout.model_dump() if win_holdout else None,
        "best_single_candidate": {
            "folder": str(anchor.folder),
            "search_macro_f1": best_single,
            "holdout_macro_f1": scores[str(anchor.folder)].holdout_macro_f1,
            "holdout_f1": scores[str(anchor.folder)].holdout_f1,
        },
        "selected": recipe["selected"],
        "merge_beats_best_candidate_on_holdout": merge_wins if win_holdout else None,
        "per_method": per_method,
        "candidates": {f: s.model_dump() for f, s in scores.items()},
        "timing": {
            "total_seconds": total_seconds,
            "evaluations": len(evaluated),
            "cache_hits": len(defaults) + len(trials) - len(evaluated),
            "mean_seconds_per_evaluation": sum(t.seconds for t in evaluated) / max(len(evaluated), 1),
        },
    }
    trials_doc = {
        "candidates": {f: s.model_dump() for f, s in scores.items()},
        "members": chosen,
        "anchor": str(anchor.folder),
        "defaults": [t.model_dump(mode="json") for t in defaults],
        "trials": [t.model_dump(mode="json") for t in trials],
    }
    import json

    (out / TRIALS_FILE).write_text(json.dumps(trials_doc, indent=2), encoding="utf-8")
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
    _log(
        f"winner {winner.config.method}/{winner.config.subset} ({winner.strategy} #{winner.iteration}): search "
        f"{winner.macro_f1:.4f}, holdout {win_holdout.macro_f1 if win_holdout else float('nan'):.4f}; best single "
        f"candidate {anchor.name} holdout {scores[anchor_key].holdout_macro_f1}; shipped: {recipe['selected']}; "
        f"{total_seconds:.0f}s total → {out}"
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
        _log(f"validation macro-F1 {res.macro_f1:.4f} over {len(rows)} rows")
    recipe = {
        "candidates": [str(c.folder) for c in candidates],
        "weights": weights,
        "method": settings.method,
        "params": config.relevant_params(),
        "seed": settings.params.seed,
        "subset": settings.subset,
        "anchor": str(anchor.folder),
        "base": str(ws.base_dir) if ws.base else None,
        "strategy": "manual",
    }
    out = Path(settings.out)
    meta = merged_meta(settings.name or out.name, candidates, anchor, thresholds, recipe, metrics)
    save_checkpoint(out, ws.model, anchor.folder, meta)
    _log(f"{settings.method} merge of {len(candidates)} models → {out}")
    return meta
