"""Plots shared by the demo and the experiments (matplotlib, written atomically as PNG).
Each returns the path written, or None when matplotlib is not installed."""
from __future__ import annotations

import os
from typing import Optional


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def _save(plt, fig, path: str) -> str:
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)
    return path


def routing_heatmap(matrix, path: str, title: str = "Mean routing probability",
                    ylabel: str = "prompt category") -> Optional[str]:
    """matrix (categories, experts) of mean routing probabilities."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5, 4))
    im = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    return _save(plt, fig, path)


def user_shift_heatmap(true_by_expert, shifts, path: str, pairs: int) -> Optional[str]:
    """Users' true profiles (users, experts) beside their adapted weight shifts."""
    plt = _pyplot()
    if plt is None:
        return None
    import numpy as np

    shifts = np.asarray(shifts)
    fig, axes = plt.subplots(1, 2, figsize=(8, 5), sharey=True)
    axes[0].imshow(true_by_expert, cmap="Greens", vmin=0, vmax=1, aspect="auto")
    axes[0].set_title("true profile (criteria mapped to experts)")
    lim = float(np.abs(shifts).max()) or 1.0
    im = axes[1].imshow(shifts, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    axes[1].set_title(f"adapted weights - mean routing ({pairs} pairs)")
    for a in axes:
        a.set_xlabel("expert")
    axes[0].set_ylabel("user")
    fig.colorbar(im, ax=axes[1])
    return _save(plt, fig, path)


def curves(series: dict, path: str, xlabel: str, ylabel: str, title: str = "",
           logx: bool = False, hline: Optional[tuple[float, str]] = None) -> Optional[str]:
    """series: label -> (xs, ys)."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, label=label)
    if hline is not None:
        ax.axhline(hline[0], color="gray", lw=1, label=hline[1])
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)
