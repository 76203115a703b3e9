"""Search strategies for the model merging search (MMS): propose a merge configuration, learn from its reward.

A configuration is a point in a factored, discrete space:

- one factor per candidate ``w<i>`` whose arms are weight levels (``WEIGHT_LEVELS``); the chosen
  levels are normalised onto the simplex (all zero → uniform weights),
- ``method`` (the merge method) and ``subset`` (the parameter subset),
- per method, its hyper-parameters ``<method>.<param>`` (density, drop rate, combination, λ) over
  discrete levels (``PARAM_LEVELS``). Slerp's interpolation factor t is not a separate factor: it
  follows from the weights (t = w₂ for two models, cumulative weights beyond).

Every strategy has the same interface, ``propose() -> Config`` and ``update(config, reward)``, where
the reward is the validation macro-F1 of the configuration. A proposed config records the arm it
chose per factor (``Config.arms``); ``update`` credits exactly those arms (the hyper-parameter
factors of other methods are untouched).

- ``thompson``: a Beta(1, 1) posterior per arm of every factor. Proposal: per factor, draw one
  sample from each arm's Beta and take the arm with the largest sample. Update: the reward becomes a
  Bernoulli outcome ``s = 1`` if it beats the median of the rewards seen so far (the history starts
  with the selected candidates' own scores, so "beating the median" means improving over the
  typical model), else ``s = 0`` (with ``rule="best"``: beating the best reward so far); every chosen
  arm gets α += s, β += 1 − s; the reward then joins the history.
- ``ucb``: UCB1 per factor on the raw reward: untried arms first (lowest index), then
  argmax mean + c·√(2 ln N / n) (N pulls of the factor, n of the arm). Update: n += 1, sum += reward.
- ``egreedy``: per factor, with probability ε a uniformly random arm, else untried arms first, then
  the arm with the best mean reward. Update: as UCB.
- ``random``: Dirichlet(1, …, 1) weights, uniform method, subset and hyper-parameter levels. No
  learning (update does nothing).
"""

from __future__ import annotations

import json
import math
import statistics
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from merging.methods import METHODS, MergeParams
from merging.subsets import SUBSETS

WEIGHT_LEVELS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
PARAM_LEVELS: dict[str, tuple[float | str, ...]] = {
    "lam": (0.6, 0.8, 1.0, 1.2, 1.5),
    "density": (0.2, 0.4, 0.6, 0.8, 1.0),
    "drop_rate": (0.1, 0.3, 0.5, 0.7, 0.9),
    "combine": ("linear", "ties"),
}


class Config(BaseModel):
    """One merge: weights per candidate (normalised), method, its hyper-parameters, parameter subset."""

    model_config = ConfigDict(extra="forbid")

    weights: list[float]
    method: str
    subset: str = "all"
    params: MergeParams = Field(default_factory=MergeParams)
    arms: dict[str, int] = Field(default_factory=dict, description="factor → arm index chosen by the strategy")

    def relevant_params(self) -> dict[str, float | str]:
        used = METHODS[self.method].params
        return {k: v for k, v in self.params.model_dump().items() if k in used}

    def key(self) -> str:
        """Identity for the evaluation cache: rounded weights, method, its own hyper-parameters, subset."""
        return json.dumps(
            {
                "w": [round(w, 4) for w in self.weights],
                "m": self.method,
                "p": self.relevant_params(),
                "s": self.subset,
                "seed": self.params.seed if self.method == "dare" else 0,
            },
            sort_keys=True,
        )


@dataclass
class SearchSpace:
    n_candidates: int
    methods: tuple[str, ...] = tuple(METHODS)
    subsets: tuple[str, ...] = tuple(SUBSETS)
    weight_levels: tuple[float, ...] = WEIGHT_LEVELS
    param_levels: dict[str, tuple[float | str, ...]] = field(default_factory=lambda: dict(PARAM_LEVELS))
    seed: int = 0  # DARE mask seed recorded in every config

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS] + [s for s in self.subsets if s not in SUBSETS]
        if unknown:
            raise ValueError(f"unknown methods/subsets {unknown}; methods: {list(METHODS)}, subsets: {list(SUBSETS)}")
        if self.n_candidates < 1 or not self.methods or not self.subsets:
            raise ValueError("the search space needs at least one candidate, method and subset")

    def factors(self, method: str | None = None) -> dict[str, int]:
        """Factor name → number of arms; with ``method``: only the factors a config of that method uses."""
        out = {f"w{i}": len(self.weight_levels) for i in range(self.n_candidates)}
        out["method"] = len(self.methods)
        out["subset"] = len(self.subsets)
        for m in self.methods if method is None else (method,):
            for p in METHODS[m].params:
                out[f"{m}.{p}"] = len(self.param_levels[p])
        return out

    def config(self, arms: dict[str, int]) -> Config:
        """The configuration of one arm per factor (hyper-parameter arms of other methods are ignored)."""
        method = self.methods[arms["method"]]
        raw = [self.weight_levels[arms[f"w{i}"]] for i in range(self.n_candidates)]
        total = sum(raw)
        weights = [w / total for w in raw] if total > 0 else [1.0 / len(raw)] * len(raw)
        values = {p: self.param_levels[p][arms[f"{method}.{p}"]] for p in METHODS[method].params}
        used = {k: v for k, v in arms.items() if k in self.factors(method)}
        return Config(
            weights=weights,
            method=method,
            subset=self.subsets[arms["subset"]],
            params=MergeParams(seed=self.seed, **values),  # type: ignore[arg-type]
            arms=used,
        )


class Strategy(ABC):
    name: str = ""

    def __init__(self, space: SearchSpace, seed: int = 0) -> None:
        self.space = space
        self.rng = np.random.default_rng(seed)

    @abstractmethod
    def propose(self) -> Config: ...

    @abstractmethod
    def update(self, config: Config, reward: float) -> None: ...


class FactoredBandit(Strategy):
    """One independent bandit per factor; subclasses choose an arm from per-factor statistics."""

    def propose(self) -> Config:
        return self.space.config({f: self.choose(f, n) for f, n in self.space.factors().items()})

    @abstractmethod
    def choose(self, factor: str, n_arms: int) -> int: ...


class Thompson(FactoredBandit):
    name = "thompson"

    def __init__(
        self,
        space: SearchSpace,
        seed: int = 0,
        history: Sequence[float] = (),
        rule: Literal["median", "best"] = "median",
    ) -> None:
        super().__init__(space, seed)
        self.alpha = {f: np.ones(n) for f, n in space.factors().items()}
        self.beta = {f: np.ones(n) for f, n in space.factors().items()}
        self.history = list(history)
        self.rule = rule

    def choose(self, factor: str, n_arms: int) -> int:
        return int(np.argmax(self.rng.beta(self.alpha[factor], self.beta[factor])))

    def success(self, reward: float) -> int:
        if not self.history:
            return 1
        bar = statistics.median(self.history) if self.rule == "median" else max(self.history)
        return int(reward > bar)

    def update(self, config: Config, reward: float) -> None:
        s = self.success(reward)
        for factor, arm in config.arms.items():
            self.alpha[factor][arm] += s
            self.beta[factor][arm] += 1 - s
        self.history.append(reward)


class _MeanBandit(FactoredBandit):
    def __init__(self, space: SearchSpace, seed: int = 0) -> None:
        super().__init__(space, seed)
        self.counts = {f: np.zeros(n) for f, n in space.factors().items()}
        self.sums = {f: np.zeros(n) for f, n in space.factors().items()}

    def means(self, factor: str) -> np.ndarray:
        n = self.counts[factor]
        return np.where(n > 0, self.sums[factor] / np.maximum(n, 1), 0.0)

    def update(self, config: Config, reward: float) -> None:
        for factor, arm in config.arms.items():
            self.counts[factor][arm] += 1
            self.sums[factor][arm] += reward


class UCB(_MeanBandit):
    name = "ucb"

    def __init__(self, space: SearchSpace, seed: int = 0, c: float = 1.0) -> None:
        super().__init__(space, seed)
        self.c = c

    def choose(self, factor: str, n_arms: int) -> int:
        n = self.counts[factor]
        untried = np.flatnonzero(n == 0)
        if untried.size:
            return int(untried[0])
        bonus = self.c * np.sqrt(2.0 * math.log(n.sum()) / n)
        return int(np.argmax(self.means(factor) + bonus))


class EpsilonGreedy(_MeanBandit):
    name = "egreedy"

    def __init__(self, space: SearchSpace, seed: int = 0, epsilon: float = 0.2) -> None:
        super().__init__(space, seed)
        self.epsilon = epsilon

    def choose(self, factor: str, n_arms: int) -> int:
        if self.rng.random() < self.epsilon:
            return int(self.rng.integers(n_arms))
        untried = np.flatnonzero(self.counts[factor] == 0)
        if untried.size:
            return int(untried[0])
        return int(np.argmax(self.means(factor)))


class RandomSearch(Strategy):
    name = "random"

    def propose(self) -> Config:
        sp = self.space
        weights = [float(w) for w in self.rng.dirichlet(np.ones(sp.n_candidates))]
        method = sp.methods[int(self.rng.integers(len(sp.methods)))]
        subset = sp.subsets[int(self.rng.integers(len(sp.subsets)))]
        values = {p: (lv := sp.param_levels[p])[int(self.rng.integers(len(lv)))] for p in METHODS[method].params}
        return Config(weights=weights, method=method, subset=subset, params=MergeParams(seed=sp.seed, **values))  # type: ignore[arg-type]

    def update(self, config: Config, reward: float) -> None:
        return None


STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (Thompson, UCB, EpsilonGreedy, RandomSearch)}


def make_strategy(name: str, space: SearchSpace, seed: int = 0, history: Sequence[float] = ()) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown search strategy {name!r}; choose one of {', '.join(STRATEGIES)} (or all)")
    if name == "thompson":
        return Thompson(space, seed, history)
    return STRATEGIES[name](space, seed)
