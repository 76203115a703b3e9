"""Merge methods: pure per-tensor functions, registered by name with their formula and source.

Every method takes the candidates' tensors for one parameter, the normalised weights (on the
simplex), the base tensor (``None`` when the base has no such parameter, e.g. the classifier head)
and the hyper-parameters, and returns the merged tensor. Methods that need a base
(``task_arithmetic``, ``ties``, ``dare``) fall back to the weighted average for parameters without
one. ``merge_state_dicts`` applies a method to a set of parameter names and takes every other
parameter from an anchor model.

Identities (tested): merging a model with itself, or putting all weight on one model, returns that
model for ``linear``, ``slerp`` and ``task_arithmetic`` (λ=1), ``ties`` (density=1, λ=1) and ``dare``
(drop rate 0, λ=1); sparsifying methods change a model by design when they trim or drop.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch

SLERP_COLINEAR_DOT = 0.9995  # |cos Ω| above this: vectors are nearly colinear, interpolate linearly
EPS = 1e-8


class MergeParams(BaseModel):
    """Hyper-parameters of the merge methods (each method reads only its own, see ``MergeMethod.params``)."""

    model_config = ConfigDict(extra="forbid")

    lam: float = Field(default=1.0, ge=0.0, le=4.0, description="λ: scale of the merged task vector")
    density: float = Field(default=0.5, gt=0.0, le=1.0, description="TIES: fraction of each δ kept (by magnitude)")
    drop_rate: float = Field(default=0.5, ge=0.0, lt=1.0, description="DARE: probability p of dropping a δ entry")
    combine: Literal["linear", "ties"] = Field(default="ties", description="DARE: how the rescaled δs are combined")
    seed: int = Field(default=0, description="DARE: seed of the drop masks")


TensorFn = Callable[
    [Sequence["torch.Tensor"], Sequence[float], "torch.Tensor | None", MergeParams, str], "torch.Tensor"
]
DeltaFn = Callable[[Sequence["torch.Tensor"], Sequence[float], MergeParams, str], "torch.Tensor"]


@dataclass(frozen=True)
class MergeMethod:
    """A registered method. ``fn(tensors, weights, base, params, name)`` merges one parameter;
    base-dependent methods also expose ``delta_fn(deltas, weights, params, name)`` (the merged task
    vector, λ included) so that callers can pass task vectors computed once."""

    name: str
    fn: TensorFn
    needs_base: bool
    params: tuple[str, ...]
    formula: str
    source: str
    delta_fn: DeltaFn | None = None


def normalise_weights(weights: Sequence[float]) -> list[float]:
    """Weights on the simplex: non-negative, summing to one."""
    if any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"merge weights must be finite and non-negative, got {list(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"merge weights must not all be zero, got {list(weights)}")
    return [float(w) / total for w in weights]


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σᵢ wᵢ·tᵢ, accumulated in place (no stacked copy of all models)."""
    out = tensors[0] * weights[0]
    for w, t in zip(weights[1:], tensors[1:], strict=True):
        out.add_(t, alpha=w)
    return out


def linear(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], base: torch.Tensor | None, p: MergeParams, name: str = ""
) -> torch.Tensor:
    return weighted_sum(tensors, weights)


def _with_base(delta_fn: DeltaFn) -> TensorFn:
    def fn(
        tensors: Sequence[torch.Tensor],
        weights: Sequence[float],
        base: torch.Tensor | None,
        p: MergeParams,
        name: str = "",
    ) -> torch.Tensor:
        if base is None:  # no task vector (e.g. the classifier head of a bare base encoder): weighted average
            return weighted_sum(tensors, weights)
        return base + delta_fn([t - base for t in tensors], weights, p, name)

    fn.__name__ = delta_fn.__name__.removesuffix("_delta")
    fn.__doc__ = delta_fn.__doc__
    return fn


def task_arithmetic_delta(
    deltas: Sequence[torch.Tensor], weights: Sequence[float], p: MergeParams, name: str = ""
) -> torch.Tensor:
    """λ·Σᵢ wᵢ·δᵢ"""
    return weighted_sum(deltas, weights).mul_(p.lam)


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the entries whose magnitude is at least the k-th largest, k = max(1, round(density·n));
    zero the rest (entries tied with the k-th magnitude are all kept)."""
    import numpy as np

    if density >= 1.0:
        return delta
    n = delta.numel()
    k = max(1, round(density * n))
    mags = delta.detach().abs()
    cut = float(np.partition(mags.reshape(-1).numpy(), n - k)[n - k])
    return delta * (mags >= cut)


def disjoint_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES sign election and disjoint mean over (already sparsified) task vectors.

    γ = sign(Σᵢ wᵢ·δᵢ) (0 counts as +); mᵢ = [sign(δᵢ) = γ] (zero entries never agree);
    merged = Σᵢ wᵢ·mᵢ·δᵢ / Σᵢ wᵢ·mᵢ (0 where no model agrees).
    Computed as γ·Σᵢ wᵢ·relu(γ·δᵢ) / Σᵢ wᵢ·[γ·δᵢ > 0], in place, without stacking the models.
    """
    import torch

    elected = torch.where(weighted_sum(deltas, weights) >= 0, 1.0, -1.0).to(deltas[0].dtype)
    num = torch.zeros_like(deltas[0])
    den = torch.zeros_like(deltas[0])
    for w, d in zip(weights, deltas, strict=True):
        agreeing = (d * elected).relu_()
        den.add_(agreeing > 0, alpha=w)
        num.add_(agreeing, alpha=w)
    return num.div_(den.clamp_(min=1e-30)).mul_(elected)


def ties_delta(
    deltas: Sequence[torch.Tensor], weights: Sequence[float], p: MergeParams, name: str = ""
) -> torch.Tensor:
    """λ·disjoint_merge(trim(δᵢ, density))"""
    return disjoint_merge([trim(d, p.density) for d in deltas], weights).mul_(p.lam)


def drop_seed(seed: int, name: str, index: int) -> int:
    """The DARE mask seed of model ``index`` for parameter ``name``: stable across runs and subsets."""
    digest = hashlib.sha256(f"{seed}\x00{name}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def dare_drop(delta: torch.Tensor, drop_rate: float, seed: int) -> torch.Tensor:
    """Drop each entry with probability p and rescale the survivors by 1/(1−p)."""
    import torch

    if drop_rate <= 0.0:
        return delta
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(delta.shape, generator=gen) >= drop_rate
    return (delta * keep).div_(1.0 - drop_rate)


def dare_delta(
    deltas: Sequence[torch.Tensor], weights: Sequence[float], p: MergeParams, name: str = ""
) -> torch.Tensor:
    """λ·combine(drop(δᵢ))"""
    dropped = [dare_drop(d, p.drop_rate, drop_seed(p.seed, name, i)) for i, d in enumerate(deltas)]
    merged = disjoint_merge(dropped, weights) if p.combine == "ties" else weighted_sum(dropped, weights)
    return merged.mul_(p.lam)


def slerp_pair(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between two tensors (as flat vectors); linear when nearly colinear.

    cos Ω = ⟨a/|a|, b/|b|⟩; slerp = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b.
    """
    import torch

    if t <= 0.0:
        return a.clone()
    if t >= 1.0:
        return b.clone()
    fa, fb = a.reshape(-1).double(), b.reshape(-1).double()
    na, nb = float(torch.linalg.vector_norm(fa)), float(torch.linalg.vector_norm(fb))
    if na < EPS or nb < EPS:
        return (1 - t) * a + t * b
    dot = max(-1.0, min(1.0, float(fa @ fb) / (na * nb)))
    if abs(dot) > SLERP_COLINEAR_DOT:
        return (1 - t) * a + t * b
    omega = math.acos(dot)
    s = math.sin(omega)
    return (math.sin((1 - t) * omega) / s) * a + (math.sin(t * omega) / s) * b


def slerp(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], base: torch.Tensor | None, p: MergeParams, name: str = ""
) -> torch.Tensor:
    """Iterative pairwise slerp with cumulative weights (models with weight 0 are skipped).

    m₁ = θ₁; mₖ = slerp(mₖ₋₁, θₖ, tₖ) with tₖ = wₖ / (w₁ + … + wₖ). For two models t = w₂. The
    result depends on the order of the models (the candidates' ranking order).
    """
    pairs = [(float(w), t) for w, t in zip(weights, tensors, strict=True) if w > 0]
    cum, merged = pairs[0][0], pairs[0][1].clone()
    for w, t in pairs[1:]:
        cum += w
        merged = slerp_pair(merged, t, w / cum)
    return merged


task_arithmetic = _with_base(task_arithmetic_delta)
ties = _with_base(ties_delta)
dare = _with_base(dare_delta)


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod(
            "linear",
            linear,
            False,
            (),
            "θ = Σᵢ wᵢ·θᵢ (weights normalised to sum to 1)",
            "Wortsman et al. 2022, Model soups (ICML)",
        ),
        MergeMethod(
            "task_arithmetic",
            task_arithmetic,
            True,
            ("lam",),
            "θ = θ_base + λ·Σᵢ wᵢ·δᵢ, δᵢ = θᵢ − θ_base",
            "Ilharco et al. 2023, Editing models with task arithmetic (ICLR)",
            task_arithmetic_delta,
        ),
        MergeMethod(
            "ties",
            ties,
            True,
            ("density", "lam"),
            "δ̂ᵢ = top-density(δᵢ); γ = sign(Σᵢ wᵢ·δ̂ᵢ); mᵢ = [sign δ̂ᵢ = γ]; θ = θ_base + λ·Σᵢ wᵢ·mᵢ·δ̂ᵢ / Σᵢ wᵢ·mᵢ",
            "Yadav et al. 2023, TIES-Merging (NeurIPS)",
            ties_delta,
        ),
        MergeMethod(
            "dare",
            dare,
            True,
            ("drop_rate", "combine", "lam"),
            "δ̃ᵢ = Bernoulli(1−p)-mask ⊙ δᵢ / (1−p); then θ_base + λ·Σᵢ wᵢ·δ̃ᵢ (combine=linear) "
            "or the TIES sign election and disjoint mean over δ̃ᵢ (combine=ties)",
            "Yu et al. 2024, Language models are Super Mario (DARE, ICML)",
            dare_delta,
        ),
        MergeMethod(
            "slerp",
            slerp,
            False,
            (),
            "2 models: sin((1−t)Ω)/sin Ω·θ₁ + sin(tΩ)/sin Ω·θ₂ with t = w₂, cos Ω = ⟨θ̂₁, θ̂₂⟩ "
            "(linear if |cos Ω| > 0.9995); k models: mₖ = slerp(mₖ₋₁, θₖ, wₖ / Σⱼ≤ₖ wⱼ)",
            "Shoemake 1985 (quaternion slerp); used for weights in mergekit (Goddard et al. 2024)",
        ),
    )
}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; choose one of {', '.join(METHODS)}") from None


def merge_tensor(
    method: str,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None = None,
    params: MergeParams | None = None,
    name: str = "",
) -> torch.Tensor:
    """One parameter merged with ``method``; weights are normalised first."""
    p = params or MergeParams()
    w = normalise_weights(weights)
    if base is not None and base.shape != tensors[0].shape:
        raise ValueError(f"{name or 'tensor'}: base shape {tuple(base.shape)} != model shape {tuple(tensors[0].shape)}")
    dtype = tensors[0].dtype
    work = [t.float() for t in tensors]
    out = get_method(method).fn(work, w, None if base is None else base.float(), p, name)
    return out.to(dtype)


def merge_state_dicts(
    method: str,
    models: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    keys: Iterable[str],
    anchor: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor] | None = None,
    params: MergeParams | None = None,
    deltas: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """A full state dict: ``keys`` merged from ``models``, every other entry taken from ``anchor``.

    Non-floating entries (e.g. position-id buffers) are always the anchor's. Models with weight 0
    are left out before merging, which does not change the result of any method. ``deltas``
    (optional, aligned with ``models``): task vectors θᵢ − θ_base computed once by the caller.
    """
    m = get_method(method)
    p = params or MergeParams()
    weights = normalise_weights(weights)
    used = [i for i, w in enumerate(weights) if w > 0]
    ws = [weights[i] for i in used]
    merged: dict[str, torch.Tensor] = dict(anchor)
    for key in keys:
        if not anchor[key].is_floating_point():
            continue
        b = base.get(key) if base is not None and m.needs_base else None
        if b is not None and deltas is not None and m.delta_fn is not None:
            merged[key] = (b + m.delta_fn([deltas[i][key] for i in used], ws, p, key)).to(anchor[key].dtype)
        else:
            merged[key] = merge_tensor(method, [models[i][key] for i in used], ws, b, p, key)
    return merged
