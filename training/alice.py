"""ALICE++ (Pereira et al., 2021): adversarial training on the hidden states of a random layer.

One power-iteration step: start from a small random perturbation δ ~ N(0, σ²) of the hidden
states at layer ℓ, take the gradient of the label term plus the virtual (symmetric KL) term with
respect to δ, and move to δ = ε·g/‖g‖ (per example). The returned loss is
``CE(f(x; δ), y) + α·symKL(f(x), f(x; δ))``, differentiable in the model's parameters and bounded
because ‖δ‖ ≤ ε.

The forward is a ``Runner``: a function of a perturbation ``(layer, hidden) -> hidden`` returning
logits. Full mode hooks the Hugging Face modules (``hf_runner``); prefix mode passes the perturbation to
``training.prefix.query_forward``, which applies it to the query-side hidden states only (the policy
states are shared by the batch's rows and never perturbed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Perturb = Callable[[int, torch.Tensor], torch.Tensor]
Runner = Callable[[Perturb | None], torch.Tensor]


def sym_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Symmetric KL divergence between two categorical distributions given as logits (batch mean)."""
    p_log = F.log_softmax(p_logits.float(), dim=-1)
    q_log = F.log_softmax(q_logits.float(), dim=-1)
    kl_pq = F.kl_div(q_log, p_log, log_target=True, reduction="batchmean")
    kl_qp = F.kl_div(p_log, q_log, log_target=True, reduction="batchmean")
    return kl_pq + kl_qp


def perturbable_modules(model: nn.Module) -> list[nn.Module]:
    """The embedding module and every encoder layer, whose outputs ALICE++ may perturb."""
    base = getattr(model, "base_model", model)
    embeddings = getattr(base, "embeddings", None)
    encoder = getattr(base, "encoder", None) or getattr(base, "transformer", None)
    layers = getattr(encoder, "layer", None) if encoder is not None else None
    if embeddings is None or layers is None:
        raise ValueError(f"ALICE++: cannot find embeddings and encoder layers in {type(model).__name__}")
    return [embeddings, *list(layers)]


def hf_runner(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Runner:
    """Full mode: the Hugging Face forward, the perturbation added by forward hooks (0 = embeddings output)."""
    modules = perturbable_modules(model)

    def run(perturb: Perturb | None) -> torch.Tensor:
        handles = []
        if perturb is not None:
            for layer, module in enumerate(modules):

                def hook(_m: nn.Module, _inp: Any, out: Any, layer: int = layer) -> Any:
                    if isinstance(out, tuple):
                        return (perturb(layer, out[0]), *out[1:])
                    return perturb(layer, out)

                handles.append(module.register_forward_hook(hook))
        try:
            return model(**inputs).logits
        finally:
            for handle in handles:
                handle.remove()

    return run


def project(grad: torch.Tensor, eps: float, norm: str = "l2") -> torch.Tensor:
    """The steepest-ascent step of size ε per example (L2 or inf norm)."""
    if norm == "inf":
        return eps * grad.sign()
    flat = grad.reshape(grad.shape[0], -1)
    scale = eps / (flat.norm(dim=1, keepdim=True) + 1e-12)
    return (flat * scale).reshape(grad.shape)


@dataclass
class AliceOutput:
    loss: torch.Tensor
    delta: torch.Tensor
    layer: int


def alice_loss(
    run: Runner,
    mask: torch.Tensor,
    labels: torch.Tensor,
    clean_logits: torch.Tensor,
    layer: int,
    eps: float = 1e-2,
    sigma: float = 1e-5,
    alpha: float = 1.0,
    norm: str = "l2",
) -> AliceOutput:
    """ALICE++ loss for one batch with the perturbation at ``layer`` (0 = embeddings); ``mask`` ``[B, L]`` marks
    the perturbable (unpadded) positions of the perturbed hidden states."""
    clean = clean_logits.detach()
    weight = mask.unsqueeze(-1).to(torch.float32)
    state: dict[str, torch.Tensor] = {}

    def init_delta(at: int, hidden: torch.Tensor) -> torch.Tensor:
        if at != layer:
            return hidden
        delta = (torch.randn_like(hidden, dtype=torch.float32) * sigma * weight).requires_grad_(True)
        state["delta"] = delta
        return hidden + delta.to(hidden.dtype)

    logits = run(init_delta)
    probe = F.cross_entropy(logits.float(), labels) + alpha * sym_kl(clean, logits)
    (grad,) = torch.autograd.grad(probe, state["delta"])
    delta = (project(grad, eps, norm) * weight).detach()

    def add_delta(at: int, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + delta.to(hidden.dtype) if at == layer else hidden

    adv_logits = run(add_delta)
    loss = F.cross_entropy(adv_logits.float(), labels) + alpha * sym_kl(clean, adv_logits)
    return AliceOutput(loss=loss, delta=delta, layer=layer)
