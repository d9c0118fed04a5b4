"""Figures for a pruning run, rendered with Agg.

Figures are built on an explicit Agg canvas, so they never touch (or switch) pyplot's global
backend and work on headless machines and in worker processes.

Each function returns a ``matplotlib.figure.Figure`` with an Agg canvas attached. Log it with
``tracker.log_figure(fig, "plots/kept_units.png")`` and then close it with ``plt.close(fig)``
(harmless for these figures; they are not registered with pyplot and are freed once unreferenced).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_kept_units", "plot_loss_curves", "plot_scores"]

_KEPT = "#1f77b4"
_TOTAL = "#d0d0d0"


def _new_figure(width: float, height: float, nrows: int = 1, ncols: int = 1):
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _check_same_length(**seqs: Sequence) -> int:
    lengths = {name: len(s) for name, s in seqs.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"per-layer lists differ in length: {lengths}")
    return next(iter(lengths.values()), 0)


def _bars(ax, kept: Sequence[int], total: Sequence[int], what: str) -> None:
    layers = np.arange(len(total))
    ax.bar(layers, total, color=_TOTAL, label=f"total {what}", width=0.8)
    ax.bar(layers, kept, color=_KEPT, label=f"kept {what}", width=0.55)
    for x, k, t in zip(layers, kept, total):
        if t > 0:
            ax.annotate(
                f"{k / t:.0%}", (x, t), ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points"
            )
    all_kept, all_total = int(sum(kept)), int(sum(total))
    frac = f" ({all_kept / all_total:.1%})" if all_total else ""
    ax.set_title(f"{what}: {all_kept} of {all_total} kept{frac}")
    ax.set_xlabel("layer")
    ax.set_ylabel(what)
    if len(layers) <= 48:
        ax.set_xticks(layers)
    ax.margins(y=0.12)
    ax.legend(loc="lower right", fontsize=8)


def plot_kept_units(
    kept_heads: list[int], total_heads: list[int], kept_neurons: list[int], total_neurons: list[int]
) -> Figure:
    """Per-layer bars: kept vs total attention heads (left) and MLP neurons (right)."""
    _check_same_length(kept_heads=kept_heads, total_heads=total_heads)
    _check_same_length(kept_neurons=kept_neurons, total_neurons=total_neurons)
    n_layers = max(len(total_heads), len(total_neurons))
    fig, axes = _new_figure(max(8.0, 0.35 * n_layers * 2), 3.6, 1, 2)
    _bars(axes[0, 0], kept_heads, total_heads, "heads")
    _bars(axes[0, 1], kept_neurons, total_neurons, "neurons")
    fig.suptitle("Kept units per layer")
    return fig


def plot_loss_curves(curves: Mapping[str, Sequence[tuple[int, float]]]) -> Figure:
    """Loss vs optimizer step, one line per curve (e.g. ``{"train": [...], "val": [...]}``).

    Non-finite points are skipped; a log y-axis is used when all losses are positive and span more
    than two decades.
    """
    fig, axes = _new_figure(7.0, 4.0)
    ax = axes[0, 0]
    positives = []
    for name, points in curves.items():
        pts = sorted((int(s), float(v)) for s, v in points if math.isfinite(float(v)))
        if not pts:
            continue
        steps, values = zip(*pts)
        marker = "o" if len(pts) <= 30 else None
        ax.plot(steps, values, label=name, marker=marker, markersize=3, linewidth=1.4)
        positives.extend(values)
    if positives and min(positives) > 0 and max(positives) / min(positives) > 100:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    return fig


def plot_scores(heads: list[list[float]], neurons: list[list[float]]) -> Figure:
    """Importance scores: heatmap of head scores (layer x head) and per-layer neuron-score spread.

    Layers may have different numbers of units (global layouts); missing cells are blank. The
    neuron panel shows, per layer, the median and the 5-95% and 25-75% ranges, plus the maximum.
    """
    n_layers = max(len(heads), len(neurons))
    fig, axes = _new_figure(12.0, max(3.5, 0.25 * n_layers + 1.5), 1, 2)

    ax = axes[0, 0]
    if heads and max((len(r) for r in heads), default=0) > 0:
        width = max(len(r) for r in heads)
        grid = np.full((len(heads), width), np.nan)
        for i, row in enumerate(heads):
            grid[i, : len(row)] = np.asarray(row, dtype=float)
        im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax, label="score")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        if len(heads) <= 48:
            ax.set_yticks(range(len(heads)))
    else:
        ax.text(0.5, 0.5, "no head scores", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("Head scores")

    ax = axes[0, 1]
    rows = [np.asarray(r, dtype=float) for r in neurons]
    rows = [r[np.isfinite(r)] for r in rows]
    layers = [i for i, r in enumerate(rows) if r.size]
    if layers:
        q = np.array([np.percentile(rows[i], [5, 25, 50, 75, 95]) for i in layers])
        mx = np.array([rows[i].max() for i in layers])
        ax.fill_between(layers, q[:, 0], q[:, 4], alpha=0.2, color=_KEPT, label="5-95%")
        ax.fill_between(layers, q[:, 1], q[:, 3], alpha=0.4, color=_KEPT, label="25-75%")
        ax.plot(layers, q[:, 2], color=_KEPT, marker="o", markersize=3, label="median")
        ax.plot(layers, mx, color="#ff7f0e", linestyle="--", linewidth=1, label="max")
        positive = all(rows[i].min() > 0 for i in layers)
        if positive and mx.max() / max(q[:, 0].min(), 1e-300) > 1e3:
            ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("score")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no neuron scores", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("Neuron scores per layer")
    return fig
