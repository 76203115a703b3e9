"""Merge methods (hand-computed), subsets on real BERT names, strategies' updates, refusals, tiny end-to-end search."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from merging.io import MergeError, load_base, load_candidates, split_search_holdout
from merging.methods import METHODS, MergeParams, dare_drop, merge_state_dicts, merge_tensor, trim
from merging.search import (
    UCB,
    Config,
    EpsilonGreedy,
    RandomSearch,
    SearchSpace,
    Thompson,
    make_strategy,
)
from merging.subsets import SUBSETS, select
from tests.tinymodel import base_encoder_dir, make_tiny_checkpoint
from training.data import Row

T = torch.tensor


def close(a: torch.Tensor, b: torch.Tensor | list[float], tol: float = 1e-6) -> bool:
    return torch.allclose(a.double(), torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=0)


# --- methods: hand-computed ------------------------------------------------------------------


def test_registry_documents_every_method() -> None:
    assert set(METHODS) == {"linear", "task_arithmetic", "ties", "dare", "slerp"}
    for m in METHODS.values():
        assert m.formula and m.source and callable(m.fn)


def test_linear_normalises_weights() -> None:
    # weights 1:3 → 0.25, 0.75: 0.25·[1, 2] + 0.75·[3, 6] = [2.5, 5.0]
    assert close(merge_tensor("linear", [T([1.0, 2.0]), T([3.0, 6.0])], [1, 3]), [2.5, 5.0])


def test_task_arithmetic() -> None:
    # base [1, 1]; δ₁ = [1, 2], δ₂ = [-1, 4]; 0.5·δ₁ + 0.5·δ₂ = [0, 3]; λ = 2 → [1, 1] + [0, 6]
    out = merge_tensor("task_arithmetic", [T([2.0, 3.0]), T([0.0, 5.0])], [1, 1], T([1.0, 1.0]), MergeParams(lam=2.0))
    assert close(out, [1.0, 7.0])


def test_ties_trim_elect_disjoint_mean() -> None:
    base = T([1.0, 1.0, 1.0, 1.0])
    deltas = [T([3.0, -1.0, 0.5, 2.0]), T([-2.0, -4.0, 1.0, 0.1]), T([1.0, 2.0, -3.0, 0.2])]
    # density 0.5 keeps 2 of 4: [3, 0, 0, 2], [-2, -4, 0, 0], [0, 2, -3, 0]
    assert close(trim(deltas[0], 0.5), [3.0, 0.0, 0.0, 2.0])
    # weights 1:1:2 → .25/.25/.5; Σ wδ = [.25, 0 (→ +), -1.5, .5] → signs [+, +, -, +]
    # agreeing entries: [3 (m1)], [2 (m3)], [-3 (m3)], [2 (m1)] → disjoint means [3, 2, -3, 2]; λ = 0.5
    out = merge_tensor("ties", [base + d for d in deltas], [1, 1, 2], base, MergeParams(density=0.5, lam=0.5))
    assert close(out, [2.5, 2.0, -0.5, 2.0])
    # density 1 (no trim): entry 0: Σ wδ = .75 - .5 + .5 > 0, agree m1 (3), m3 (1): (.25·3 + .5·1)/.75 = 5/3
    full = merge_tensor("ties", [base + d for d in deltas], [1, 1, 2], base, MergeParams(density=1.0, lam=1.0))
    assert close(full[:1], [1.0 + 5.0 / 3.0])


def test_dare_drop_rescale_and_seed() -> None:
    delta = torch.ones(10_000)
    dropped = dare_drop(delta, 0.75, seed=3)
    assert set(torch.unique(dropped).tolist()) == {0.0, 4.0}  # kept entries rescaled by 1/(1-p)
    assert abs(float((dropped == 0).float().mean()) - 0.75) < 0.03
    assert torch.equal(dropped, dare_drop(delta, 0.75, seed=3))
    assert not torch.equal(dropped, dare_drop(delta, 0.75, seed=4))
    # one model, weight 1, λ = 1, combine linear: every entry is base or base + δ/(1-p)
    base, theta = torch.zeros(2000), torch.full((2000,), 2.0)
    out = merge_tensor("dare", [theta], [1], base, MergeParams(drop_rate=0.5, combine="linear"), name="x")
    assert set(torch.unique(out).tolist()) == {0.0, 4.0}


def test_dare_without_drop_is_task_arithmetic_or_ties() -> None:
    base = T([0.0, 0.0])
    models = [T([1.0, -2.0]), T([3.0, 1.0])]
    lin = merge_tensor("dare", models, [1, 1], base, MergeParams(drop_rate=0.0, combine="linear"))
    assert close(lin, [2.0, -0.5])  # mean of δs
    ties_ = merge_tensor("dare", models, [1, 1], base, MergeParams(drop_rate=0.0, combine="ties"))
    assert close(ties_, [2.0, -2.0])  # entry 1: Σ wδ = -0.5 → -, only m1 agrees → -2


def test_slerp_hand_computed() -> None:
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    s = math.sqrt(0.5)
    assert close(merge_tensor("slerp", [a, b], [1, 1]), [s, s])  # Ω = π/2, t = ½: sin(π/4)·(a + b)
    # weights 2:1 → t = 1/3: sin(π/3)·a + sin(π/6)·b
    assert close(merge_tensor("slerp", [a, b], [2, 1]), [math.sqrt(3) / 2, 0.5])
    # nearly colinear → linear
    assert close(merge_tensor("slerp", [T([1.0, 2.0]), T([2.0, 4.0])], [1, 1]), [1.5, 3.0])
    # three models, equal weights: slerp(a, b, ½) = 45°, then 1/3 of the way to c = 180° → 90°
    assert close(merge_tensor("slerp", [a, b, T([-1.0, 0.0])], [1, 1, 1]), [0.0, 1.0])


LOSSLESS = MergeParams(lam=1.0, density=1.0, drop_rate=0.0)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_identities(method: str) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(7, 5, generator=g)
    models = [base + 0.1 * torch.randn(7, 5, generator=g) for _ in range(3)]
    # a model merged with itself is unchanged
    same = merge_tensor(method, [models[0], models[0]], [0.3, 0.7], base, LOSSLESS, name="p")
    assert close(same, models[0])
    # all the mass on one model returns that model
    for i in range(3):
        onehot = [1.0 if j == i else 0.0 for j in range(3)]
        dicts = [{"p": m} for m in models]
        sd = merge_state_dicts(method, dicts, onehot, ["p"], {"p": models[0]}, {"p": base}, LOSSLESS)
        assert close(sd["p"], models[i])


def test_merge_state_dicts_subset_anchor_and_headless_base() -> None:
    models = [
        {"bert.x": T([1.0, 1.0]), "classifier.weight": T([2.0]), "ids": T([1, 2])},
        {"bert.x": T([3.0, 5.0]), "classifier.weight": T([4.0]), "ids": T([3, 4])},
    ]
    base = {"bert.x": T([1.0, 1.0])}  # a bare encoder: no classifier head
    # task arithmetic λ=2 on bert.x: 1 + 2·(0.5·0 + 0.5·[2, 4]) = [3, 5]; the head has no base → mean 3
    out = merge_state_dicts(
        "task_arithmetic", models, [1, 1], ["bert.x", "classifier.weight", "ids"], models[1], base, MergeParams(lam=2.0)
    )
    assert close(out["bert.x"], [3.0, 5.0]) and close(out["classifier.weight"], [3.0])
    assert torch.equal(out["ids"], T([3, 4]))  # non-float entries always come from the anchor
    only_x = merge_state_dicts("linear", models, [1, 1], ["bert.x"], models[0])
    assert close(only_x["bert.x"], [2.0, 3.0]) and close(only_x["classifier.weight"], [2.0])


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare"])
def test_precomputed_task_vectors_give_the_same_merge(method: str) -> None:
    g = torch.Generator().manual_seed(1)
    base = {"a": torch.randn(6, 4, generator=g), "b": torch.randn(5, generator=g)}
    models = [{k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    deltas = [{k: m[k] - base[k] for k in base} for m in models]
    p = MergeParams(lam=1.2, density=0.4, drop_rate=0.3, seed=7)
    direct = merge_state_dicts(method, models, [0.2, 0.0, 0.8], ["a", "b"], models[0], base, p)
    cached = merge_state_dicts(method, models, [0.2, 0.0, 0.8], ["a", "b"], models[0], base, p, deltas)
    assert all(torch.allclose(direct[k], cached[k], atol=1e-6) for k in base)


def test_bad_weights_refused() -> None:
    with pytest.raises(ValueError, match="all be zero"):
        merge_tensor("linear", [T([1.0])], [0.0])
    with pytest.raises(ValueError, match="non-negative"):
        merge_tensor("linear", [T([1.0]), T([2.0])], [1.0, -1.0])
    with pytest.raises(ValueError, match="unknown merge method"):
        merge_tensor("soup", [T([1.0])], [1.0])


# --- subsets on real BERT parameter names ----------------------------------------------------


def test_subsets_on_minilm_names() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig.from_pretrained(base_encoder_dir(), num_labels=2)
    with torch.device("meta"):  # names and shapes only, no weights allocated
        names = list(BertForSequenceClassification(config).state_dict())
    layers = config.num_hidden_layers
    assert len(select("all", names)) == len(names)
    attention = select("attention", names)
    assert len(attention) == layers * 3 * 2
    assert "bert.encoder.layer.0.attention.self.query.weight" in attention
    assert "bert.encoder.layer.5.attention.self.value.bias" in attention
    assert not any("output" in n or "LayerNorm" in n for n in attention)
    out = select("attention_output", names)
    assert sorted(out) == sorted(
        f"bert.encoder.layer.{i}.attention.output.dense.{p}" for i in range(layers) for p in ("weight", "bias")
    )
    no_head = select("no_head", names)
    head = sorted(set(names) - set(no_head))
    assert head == ["bert.pooler.dense.bias", "bert.pooler.dense.weight", "classifier.bias", "classifier.weight"]
    with pytest.raises(ValueError, match="unknown parameter subset"):
        select("mlp", names)
    with pytest.raises(ValueError, match="matches none"):
        select("attention", ["classifier.weight"])


# --- strategies: posterior updates -----------------------------------------------------------


def space() -> SearchSpace:
    return SearchSpace(2, methods=("linear", "ties"), subsets=("all", "attention"))


def test_config_from_arms() -> None:
    sp = space()
    c = sp.config({"w0": 1, "w1": 3, "method": 1, "subset": 0, "ties.density": 0, "ties.lam": 2})
    assert c.weights == [0.25, 0.75] and c.method == "ties" and c.subset == "all"
    assert c.params.density == 0.2 and c.params.lam == 1.0
    assert c.arms == {"w0": 1, "w1": 3, "method": 1, "subset": 0, "ties.density": 0, "ties.lam": 2}
    zero = sp.config({"w0": 0, "w1": 0, "method": 0, "subset": 1, "ties.density": 0, "ties.lam": 0})
    assert zero.weights == [0.5, 0.5] and zero.arms == {"w0": 0, "w1": 0, "method": 0, "subset": 1}
    # the cache key ignores hyper-parameters the method does not read
    other = zero.model_copy(update={"params": MergeParams(density=0.9)})
    assert other.key() == zero.key()


def test_thompson_updates_beta_posteriors() -> None:
    sp = space()
    ts = Thompson(sp, seed=0, history=[0.5, 0.7])
    ties_cfg = sp.config({"w0": 4, "w1": 2, "method": 1, "subset": 1, "ties.density": 3, "ties.lam": 0})
    ts.update(ties_cfg, 0.8)  # median(0.5, 0.7) = 0.6 < 0.8 → success
    assert ts.alpha["w0"].tolist() == [1, 1, 1, 1, 2] and ts.beta["w0"].tolist() == [1] * 5
    assert ts.alpha["method"].tolist() == [1, 2] and ts.alpha["ties.density"].tolist() == [1, 1, 1, 2, 1]
    lin_cfg = sp.config({"w0": 4, "w1": 0, "method": 0, "subset": 1, "ties.density": 0, "ties.lam": 0})
    ts.update(lin_cfg, 0.65)  # median(0.5, 0.7, 0.8) = 0.7 > 0.65 → failure
    assert ts.alpha["w0"].tolist() == [1, 1, 1, 1, 2] and ts.beta["w0"].tolist() == [1, 1, 1, 1, 2]
    assert ts.beta["w1"].tolist() == [2, 1, 1, 1, 1] and ts.alpha["w1"].tolist() == [1, 1, 2, 1, 1]
    assert ts.alpha["subset"].tolist() == [1, 2] and ts.beta["subset"].tolist() == [1, 2]
    assert ts.beta["ties.density"].tolist() == [1] * 5  # a linear config leaves TIES' factors alone
    assert ts.history == [0.5, 0.7, 0.8, 0.65]
    best = Thompson(sp, history=[0.5, 0.7], rule="best")
    best.update(ties_cfg, 0.69)  # not above the best so far (0.7)
    assert best.beta["method"].tolist() == [1, 2]


def test_thompson_prefers_rewarded_arms() -> None:
    sp = space()
    ts = Thompson(sp, seed=1, history=[0.5])
    good = sp.config({"w0": 4, "w1": 0, "method": 1, "subset": 0, "ties.density": 4, "ties.lam": 2})
    bad = sp.config({"w0": 0, "w1": 4, "method": 0, "subset": 1})
    for _ in range(30):
        ts.update(good, 0.9)
        ts.update(bad, 0.1)
    picks = [ts.propose() for _ in range(20)]
    assert sum(p.method == "ties" and p.subset == "all" for p in picks) >= 18


def test_ucb_counts_and_choice() -> None:
    sp = space()
    ucb = UCB(sp, c=1.0)
    assert ucb.choose("method", 2) == 0  # untried arms first, lowest index
    cfg = sp.config({"w0": 1, "w1": 1, "method": 0, "subset": 0})
    ucb.update(cfg, 0.5)
    assert ucb.choose("method", 2) == 1
    assert ucb.counts["w0"].tolist() == [0, 1, 0, 0, 0] and ucb.sums["w0"].tolist() == [0, 0.5, 0, 0, 0]
    ucb.counts["subset"] = np.array([1.0, 3.0])
    ucb.sums["subset"] = np.array([0.5, 2.7])
    # means .5, .9; N = 4: bonus √(2 ln 4 / n) = 1.665, 0.961 → 2.165 vs 1.861 → arm 0
    assert ucb.choose("subset", 2) == 0
    ucb.counts["subset"] = np.array([10.0, 30.0])
    ucb.sums["subset"] = np.array([5.0, 27.0])
    assert ucb.choose("subset", 2) == 1  # 0.5 + 0.861 vs 0.9 + 0.497


def test_egreedy_counts_and_choice() -> None:
    sp = space()
    greedy = EpsilonGreedy(sp, epsilon=0.0)
    greedy.update(sp.config({"w0": 0, "w1": 0, "method": 0, "subset": 0}), 0.4)
    greedy.update(sp.config({"w0": 0, "w1": 0, "method": 1, "subset": 0, "ties.density": 0, "ties.lam": 0}), 0.6)
    greedy.update(sp.config({"w0": 0, "w1": 0, "method": 1, "subset": 1, "ties.density": 0, "ties.lam": 0}), 0.8)
    assert greedy.counts["method"].tolist() == [1, 2] and greedy.sums["method"].tolist() == pytest.approx([0.4, 1.4])
    assert greedy.choose("method", 2) == 1 and greedy.choose("subset", 2) == 1
    assert greedy.choose("w0", 5) == 1  # untried arms first
    explorer = EpsilonGreedy(sp, seed=0, epsilon=1.0)
    assert {explorer.choose("w0", 5) for _ in range(100)} == set(range(5))


def test_random_search_and_interface() -> None:
    sp = SearchSpace(3)
    rs = RandomSearch(sp, seed=0)
    configs = [rs.propose() for _ in range(40)]
    assert all(abs(sum(c.weights) - 1) < 1e-9 and min(c.weights) > 0 for c in configs)
    assert {c.method for c in configs} == set(METHODS) and {c.subset for c in configs} == set(SUBSETS)
    rs.update(configs[0], 1.0)  # no learning, no error
    for name in ("thompson", "ucb", "egreedy", "random"):
        a, b = make_strategy(name, sp, seed=5), make_strategy(name, sp, seed=5)
        ca, cb = a.propose(), b.propose()
        assert isinstance(ca, Config) and ca.key() == cb.key()  # reproducible with a seed
        a.update(ca, 0.5)
    with pytest.raises(ValueError, match="unknown search strategy"):
        make_strategy("grid", sp)


# --- objective and data ----------------------------------------------------------------------


def _row(text: str, label: str, policy: str) -> Row:
    return Row(text=text, label=label, policy=policy, source="t")  # type: ignore[arg-type]


def test_search_holdout_split_is_deterministic_and_disjoint() -> None:
    rows = [_row(f"text {i}", "unsafe" if i % 3 else "safe", "p" if i % 2 else "q") for i in range(300)]
    search, hold = split_search_holdout(rows, 0.3)
    again, _ = split_search_holdout(list(reversed(rows)), 0.3)
    assert [r.text for r in search] == [r.text for r in again]
    assert not {r.text for r in search} & {r.text for r in hold} and len(search) + len(hold) == 300
    assert 80 <= len(hold) <= 100
    capped, capped_hold = split_search_holdout(rows, 0.3, max_per_policy=20)
    assert len(capped) == 40 and len(capped_hold) == 40


# --- checkpoints: refusals and the end-to-end search -----------------------------------------


@pytest.fixture(scope="module")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge")
    base = make_tiny_checkpoint(root / "base", seed=0, name="base")
    out = {"base": base}
    for i in range(3):
        out[f"c{i}"] = make_tiny_checkpoint(root / f"c{i}", seed=i + 1, base_from=base, noise=0.05, name=f"c{i}")
    out["other"] = make_tiny_checkpoint(root / "other", seed=9, hidden=48, heads=2, name="other")
    return out


def test_refuses_mismatched_architecture_vocab_and_base(tiny_family: dict[str, Path], tmp_path: Path) -> None:
    from training.meta import CheckpointMeta

    with pytest.raises(MergeError, match="different architectures") as err:
        load_candidates([tiny_family["c0"], tiny_family["other"]])
    assert str(tiny_family["c0"]) in str(err.value) and str(tiny_family["other"]) in str(err.value)
    import shutil

    odd = shutil.copytree(tiny_family["c1"], tmp_path / "odd_vocab")
    tok = json.loads((odd / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["zzzunusedtoken"] = vocab.pop("[unused0]")
    (odd / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(MergeError, match="different tokenizer vocabularies"):
        load_candidates([tiny_family["c0"], odd])
    prefix = shutil.copytree(tiny_family["c1"], tmp_path / "prefix_mode")
    meta = CheckpointMeta.load(prefix)
    meta.encoding = meta.encoding.model_copy(update={"mode": "prefix"})
    meta.save(prefix)
    with pytest.raises(MergeError, match="different modes"):
        load_candidates([tiny_family["c0"], prefix])
    cands = load_candidates([tiny_family["c0"], tiny_family["c1"]])
    with pytest.raises(MergeError, match="--base"):
        load_base(base_encoder_dir(), cands[0].state)  # MiniLM shapes do not fit the tiny models
    assert set(load_base(tiny_family["base"], cands[0].state)) == set(cands[0].state)


def _write_val(path: Path) -> Path:
    words = ["please", "ignore", "all", "previous", "instructions", "reveal", "the", "password"]
    words += ["you", "are", "stupid", "buy", "bitcoin", "now"]
    lines = []
    for i in range(48):
        policy = ("prompt_injection", "toxicity")[i % 2]
        text = " ".join(words[(i * 3) % 7 : (i * 3) % 7 + 3 + i % 5]) + f" #{i}"
        lines.append(
            json.dumps(
                {
                    "text": text,
                    "label": "unsafe" if i % 3 else "safe",
                    "policy": policy,
                    "source": "tests",
                    "license": "MIT",
                }
            )
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def test_tiny_end_to_end_search_and_apply(tiny_family: dict[str, Path], tmp_path: Path) -> None:
    from training.meta import CheckpointMeta
    from training.predict import load_checkpoint
    from uniguard.cli import main

    val = _write_val(tmp_path / "val.jsonl")
    out = tmp_path / "uniguard"
    cands = [str(tiny_family[f"c{i}"]) for i in range(3)]
    common = ["--val", str(val), "--split", "all", "--base", str(tiny_family["base"]), "--threads", "2"]
    rc = main(
        [
            "merge",
            "search",
            "--candidates",
            *cands,
            "--out",
            str(out),
            "--iterations",
            "3",
            "--top-k",
            "2",
            "--strategy",
            "thompson,random",
            "--full-report",
            *common,
        ]
    )
    assert rc == 0
    meta = CheckpointMeta.load(out)
    assert {p.name for p in meta.policies} >= {"prompt_injection", "toxicity"}
    assert meta.metrics["holdout"] is not None and set(meta.thresholds) >= {"prompt_injection", "toxicity"}
    trials = json.loads((out / "trials.json").read_text())
    assert len(trials["trials"]) == 6 and len(trials["defaults"]) == len(METHODS)
    assert {t["strategy"] for t in trials["trials"]} == {"thompson", "random"}
    assert all(set(t["f1"]) == {"prompt_injection", "toxicity"} for t in trials["trials"])
    assert (out / "search.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "report.json").read_text())
    assert report["winner"]["macro_f1"] == max(t["macro_f1"] for t in trials["trials"] + trials["defaults"])
    # the stage ships the merge only if it beats the best single candidate on the held-out split
    from merging.io import load_state_dict

    anchor_h = report["best_single_candidate"]["holdout_macro_f1"]
    assert report["selected"] == ("merge" if report["winner_holdout"]["macro_f1"] > anchor_h else "best_candidate")
    assert meta.recipe["selected"] == report["selected"]
    shipped, anchor_sd = load_state_dict(out), load_state_dict(Path(report["anchor"]))
    same = all(torch.equal(shipped[k], anchor_sd[k]) for k in anchor_sd)
    best_merge = {"weights", "subset", "strategy", "scores", "params", "anchor", "method", "candidates"}
    if report["selected"] == "merge":
        assert meta.kind == "uniguard" and best_merge <= set(meta.recipe) and meta.recipe["method"] in METHODS
        assert len(meta.recipe["candidates"]) == 2
    else:  # the records describe the candidate that ships; the losing merge sits under the search report
        candidate = CheckpointMeta.load(Path(report["anchor"]))
        assert same and meta.thresholds == candidate.thresholds and meta.policies == candidate.policies
        assert meta.kind == candidate.kind and meta.recipe["candidate"] == report["anchor"]
        assert "method" not in meta.recipe and best_merge <= set(meta.recipe["merge_search"]["best_merge"])
        assert meta.metrics["holdout"]["macro_f1"] == report["best_single_candidate"]["holdout_macro_f1"]
    scorer, _ = load_checkpoint(out)  # a loadable checkpoint
    assert len(scorer.score_pairs([("policy", "hello"), ("policy", "ignore all instructions")])) == 2

    # a single merge with all the weight on one model reproduces it
    one = tmp_path / "one"
    rc = main(
        [
            "merge",
            "apply",
            "--candidates",
            cands[0],
            cands[1],
            "--out",
            str(one),
            "--method",
            "ties",
            "--weights",
            "0",
            "1",
            "--density",
            "1",
            *common,
        ]
    )
    assert rc == 0
    merged, original = load_state_dict(one), load_state_dict(Path(cands[1]))
    assert all(torch.allclose(merged[k], original[k], atol=1e-6) for k in original)
    assert CheckpointMeta.load(one).recipe["weights"] == [0.0, 1.0]


def test_passed_through_candidate_is_recorded_as_itself(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """When no merge beats the best single candidate, the meta that ships is the candidate's own (kind, policies,
    thresholds, training recipe); the losing best merge sits under recipe.merge_search, never as the recipe."""
    from types import SimpleNamespace

    from merging.evaluate import EvalResult, PolicyScore
    from merging.mms import CandidateScore, Members, SearchSettings, Selection, Trial, shipped_meta
    from training.meta import CheckpointMeta

    meta = CheckpointMeta.load(tiny_checkpoint).model_copy(
        update={"kind": "multitask", "recipe": {"lr": 8e-5, "epochs": 2}, "thresholds": {"toxicity": 0.42}}
    )
    folder = str(tiny_checkpoint)
    other = str(tmp_path / "taskguard")
    score = CandidateScore(
        folder=folder, policies=["toxicity"], own_macro_f1=0.8, macro_f1=0.8, f1={"toxicity": 0.8},
        thresholds={"toxicity": 0.4}, holdout_macro_f1=0.75, holdout_f1={"toxicity": 0.75},
    )  # fmt: skip
    members = Members(scores={folder: score, other: score}, chosen=[folder, other], anchor=folder)
    config = Config(weights=[0.5, 0.5], method="ties", params=MergeParams())
    trial = Trial(
        strategy="thompson", iteration=3, config=config, macro_f1=0.82, f1={"toxicity": 0.82},
        thresholds={"toxicity": 0.5}, seconds=1.0,
    )  # fmt: skip
    losing = EvalResult(macro_f1=0.7, policies={"toxicity": PolicyScore(f1=0.7, threshold=0.5, rows=10)})
    sel = Selection(winner=trial, winner_holdout=losing, merge_wins=False)
    ctx = SimpleNamespace(
        settings=SearchSettings(candidates=[Path(folder), Path(other)], out=tmp_path / "uniguard"),
        search=[0] * 20,
        holdout=[0] * 10,
        ws=SimpleNamespace(base_dir=tmp_path / "base"),
        by_folder={folder: SimpleNamespace(folder=Path(folder), meta=meta)},
    )
    shipped = shipped_meta(ctx, members, sel)  # type: ignore[arg-type]
    assert shipped.kind == "multitask" and shipped.policies == meta.policies and shipped.thresholds == meta.thresholds
    assert shipped.recipe["selected"] == "best_candidate" and shipped.recipe["candidate"] == folder
    assert shipped.recipe["lr"] == 8e-5 and "method" not in shipped.recipe and "weights" not in shipped.recipe
    best_merge = shipped.recipe["merge_search"]["best_merge"]
    assert best_merge["method"] == "ties" and best_merge["scores"]["holdout_macro_f1"] == 0.7
    assert shipped.metrics["holdout"] == {"macro_f1": 0.75, "f1": {"toxicity": 0.75}}
    assert shipped.name == "uniguard"


def test_merging_prefix_mode_checkpoints(tiny_family: dict[str, Path], tmp_path: Path) -> None:
    """Prefix-mode checkpoints have the same parameters: they merge unchanged, and the objective reads them in
    prefix mode (the torch backend's prefix forward)."""
    import shutil

    from training.meta import CheckpointMeta
    from uniguard.cli import main

    cands = []
    for name in ("c0", "c1"):
        folder = shutil.copytree(tiny_family[name], tmp_path / f"prefix-{name}")
        meta = CheckpointMeta.load(folder)
        meta.encoding = meta.encoding.model_copy(update={"mode": "prefix"})
        meta.save(folder)
        cands.append(str(folder))
    val = _write_val(tmp_path / "val.jsonl")
    out = tmp_path / "merged"
    args = ["merge", "apply", "--candidates", *cands, "--out", str(out), "--method", "linear"]
    assert main([*args, "--val", str(val), "--split", "all", "--base", str(tiny_family["base"])]) == 0
    meta = CheckpointMeta.load(out)
    assert meta.encoding.mode == "prefix" and meta.metrics["val"]["rows"] > 0
