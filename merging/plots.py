"""Best-so-far validation macro-F1 per iteration, one line per strategy (PNG, matplotlib Agg)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def best_so_far(values: Sequence[float]) -> list[float]:
    out: list[float] = []
    for v in values:
        out.append(v if not out else max(out[-1], v))
    return out


def plot_search(
    curves: Mapping[str, Sequence[float]],
    out: Path,
    best_candidate: float | None = None,
    defaults: Mapping[str, float] | None = None,
    title: str = "Model merging search",
) -> Path:
    """``curves``: strategy → reward per iteration (plotted as best-so-far)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, values in curves.items():
        ys = best_so_far(values)
        ax.plot(range(1, len(ys) + 1), ys, marker="o", markersize=3, label=name)
    if best_candidate is not None:
        ax.axhline(best_candidate, color="grey", linestyle="--", label="best single candidate")
    for name, value in (defaults or {}).items():
        ax.scatter([0], [value], marker="x", label=f"default {name}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("best-so-far validation macro-F1")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
