"""Plots shared by the demo and the experiments (matplotlib, written atomically as PNG).
Each returns the path written, or None when matplotlib is not installed."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np


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
                    ylabel: str = "prompt category", xlabel: str = "expert", vmin: float = 0.0,
                    vmax: float = 1.0, cmap: str = "viridis") -> Optional[str]:
    """matrix (rows, experts), e.g. mean routing probabilities by category, or correlations
    (vmin=-1, cmap="RdBu_r")."""
    plt = _pyplot()
    if plt is None:
        return None
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5, 4))
    im = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    return _save(plt, fig, path)


def user_shift_heatmap(true_by_expert, shifts, path: str, pairs: int,
                       true_title: str = "true profile\n(criteria mapped to experts)",
                       method: str = "") -> Optional[str]:
    """Users' true profiles (users, experts) beside their adapted weight shifts (users,
    experts): one row per user, integer user and expert ids on the axes."""
    plt = _pyplot()
    if plt is None:
        return None
    from matplotlib.ticker import MaxNLocator

    true_by_expert, shifts = np.asarray(true_by_expert), np.asarray(shifts)
    users = shifts.shape[0]
    fig, axes = plt.subplots(1, 2, figsize=(10, min(12, 2.5 + 0.22 * users)), sharey=True)
    im0 = axes[0].imshow(true_by_expert, cmap="Greens", vmin=0, vmax=1, aspect="auto",
                         interpolation="nearest")
    axes[0].set_title(true_title, fontsize=10)
    lim = float(np.abs(shifts).max()) or 1.0
    im1 = axes[1].imshow(shifts, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto",
                         interpolation="nearest")
    axes[1].set_title("adapted weights - mean routing", fontsize=10)
    for a in axes:
        a.set_xlabel("expert")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("user")
    fig.colorbar(im0, ax=axes[0], fraction=0.046, pad=0.04)
    fig.colorbar(im1, ax=axes[1], fraction=0.046, pad=0.04)
    fig.suptitle(f"User profiles from {pairs} labelled pairs each"
                 + (f" ({method})" if method else ""), fontsize=11)
    return _save(plt, fig, path)


def curves(series: dict, path: str, xlabel: str, ylabel: str, title: str = "",
           logx: bool = False, hline: Optional[tuple[float, str]] = None,
           errors: Optional[dict] = None) -> Optional[str]:
    """series: label -> (xs, ys); errors: label -> stds drawn as a shaded band."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5) if errors else (6, 4))
    for label, (xs, ys) in series.items():
        line, = ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, label=label)
        if errors and label in errors:
            lo = np.asarray(ys) - np.asarray(errors[label])
            hi = np.asarray(ys) + np.asarray(errors[label])
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    if hline is not None:
        ax.axhline(hline[0], color="gray", lw=1, label=hline[1])
    if logx:  # ticks at the values measured, written as plain numbers
        ax.set_xscale("log", base=2)
        ticks = sorted({x for xs, _ in series.values() for x in xs})
        ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 5:  # many curves: the legend beside the plot, not over it
        fig.set_size_inches(fig.get_size_inches()[0] + 3.5, fig.get_size_inches()[1])
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8)
    return _save(plt, fig, path)


def bars(values, path: str, xlabel: str, ylabel: str, title: str = "") -> Optional[str]:
    """One bar per entry of values (e.g. each expert's load), integer ids on the axis."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(range(len(values)), values)
    ax.set_xticks(range(len(values)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)


def benchmark_bars(rows: list, path: str, x_key: str, series_key: str, panel_key: str = "mode",
                   value_key: str = "median_us", title: str = "") -> Optional[str]:
    """Grouped bars of rows[value_key] (log scale): one panel per value of panel_key (e.g.
    fwd / fwd+bwd), groups by x_key (e.g. E or T), one bar per series_key (provider)."""
    plt = _pyplot()
    if plt is None or not rows:
        return None
    modes = list(dict.fromkeys(r.get(panel_key, "") for r in rows))
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        sub = [r for r in rows if r.get(panel_key, "") == mode]
        groups = list(dict.fromkeys(r[x_key] for r in sub))
        series = list(dict.fromkeys(r[series_key] for r in sub))
        width = 0.8 / len(series)
        for i, name in enumerate(series):
            xs, ys = [], []
            for j, group in enumerate(groups):
                hit = [r[value_key] for r in sub if r[x_key] == group and r[series_key] == name]
                if hit:
                    xs.append(j + (i - (len(series) - 1) / 2) * width)
                    ys.append(hit[0])
            ax.bar(xs, ys, width, label=name)
        ax.set_xticks(range(len(groups)), [f"{x_key}={g}" for g in groups])
        ax.set_yscale("log")
        ax.set_ylabel(value_key.replace("_", " "))
        ax.set_title(f"{title} {mode}".strip())
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)
