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
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["plot_kept_units", "plot_loss_curves", "plot_run_losses", "plot_scores"]

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
    _integer_ticks(ax.xaxis, len(layers))
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
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    return fig


def plot_run_losses(history: Sequence[Mapping[str, float]], final: tuple[int, float] | None = None) -> Figure:
    """The train and validation losses of a run's history, ending at `final` (step, val loss): the evaluation after
    training, which the history does not hold (the loop skips its last evaluation for it)."""
    train = [(h["step"], h["train_loss"]) for h in history if "train_loss" in h]
    validation = {h["step"]: h["val_loss"] for h in history if "val_loss" in h}
    if final is not None:
        validation[final[0]] = final[1]
    return plot_loss_curves({"train": train, "validation": sorted(validation.items())})


def plot_scores(heads: list[list[float]], neurons: list[list[float]], kept_heads: list[list[int]] | None = None,
                kept_neurons: list[list[int]] | None = None) -> Figure:
    """Importance scores with the plan's choice on them: head scores per layer x head (removed heads in grey)
    and each layer's neuron scores as a strip (kept in colour, removed in grey), so one sees where the cut fell.

    `kept_heads` / `kept_neurons` are the plan's kept indices per layer (None: nothing marked). Layers may
    have different numbers of units (global layouts); missing cells are blank.
    """
    n_layers = max(len(heads), len(neurons))
    fig, axes = _new_figure(12.0, max(3.5, 0.25 * n_layers + 1.5), 1, 2)
    _head_heatmap(fig, axes[0, 0], heads, kept_heads)
    _neuron_strips(axes[0, 1], neurons, kept_neurons)
    return fig


def _kept_mask(rows: Sequence[Sequence[float]], kept: list[list[int]] | None, width: int) -> np.ndarray:
    """True where a unit is kept (everything when the plan is not given); layers x `width`."""
    mask = np.zeros((len(rows), width), dtype=bool)
    for i, row in enumerate(rows):
        if kept is None:
            mask[i, : len(row)] = True
        else:
            mask[i, list(kept[i])] = True
    return mask


def _integer_ticks(axis, count: int, every_up_to: int = 48) -> None:
    """Layer (or head) numbers, never 0.5: every index while they fit, else integer steps."""
    if count <= every_up_to:
        axis.set_ticks(range(count))
    else:
        axis.set_major_locator(MaxNLocator(integer=True))


def _head_heatmap(fig: Figure, ax, heads: list[list[float]], kept: list[list[int]] | None) -> None:
    ax.set_title("Head scores" + (" (removed in grey)" if kept is not None else ""))
    width = max((len(r) for r in heads), default=0)
    if not width:
        ax.text(0.5, 0.5, "no head scores", ha="center", va="center", transform=ax.transAxes)
        return
    grid = np.full((len(heads), width), np.nan)
    for i, row in enumerate(heads):
        grid[i, : len(row)] = np.asarray(row, dtype=float)
    mask = _kept_mask(heads, kept, width)
    im = ax.imshow(np.ma.masked_where(~mask | np.isnan(grid), grid), aspect="auto", cmap="viridis", interpolation="nearest")
    removed = np.ma.masked_where(mask | np.isnan(grid), np.zeros_like(grid))
    ax.imshow(removed, aspect="auto", cmap=ListedColormap([_TOTAL]), interpolation="nearest")
    fig.colorbar(im, ax=ax, label="score (kept)" if kept is not None else "score")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    _integer_ticks(ax.xaxis, width, every_up_to=24)
    _integer_ticks(ax.yaxis, len(heads))


def _strip(values: np.ndarray, per_layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to `per_layer` finite scores evenly spaced in rank order (the whole distribution, and drawable for
    an 11,008-neuron layer) and their x offsets within the layer's column."""
    finite = np.flatnonzero(np.isfinite(values))
    order = finite[np.argsort(values[finite], kind="stable")]
    shown = order[np.unique(np.linspace(0, order.size - 1, min(per_layer, order.size)).round().astype(int))] if order.size else order
    return shown, np.linspace(-0.35, 0.35, shown.size) if shown.size > 1 else np.zeros(shown.size)


def _neuron_strips(ax, neurons: list[list[float]], kept: list[list[int]] | None, per_layer: int = 300) -> None:
    """Each layer's neuron scores as a strip, kept and removed apart, with the layer's median."""
    ax.set_title("Neuron scores per layer")
    points: dict[bool, tuple[list, list]] = {True: ([], []), False: ([], [])}
    medians, shown_values = [], []
    for i, row in enumerate(neurons):
        values = np.asarray(row, dtype=float)
        shown, offsets = _strip(values, per_layer)
        if not shown.size:
            continue
        keep = _kept_mask([row], None if kept is None else [kept[i]], len(values))[0][shown]
        for is_kept in (True, False):
            points[is_kept][0].extend(i + offsets[keep == is_kept])
            points[is_kept][1].extend(values[shown][keep == is_kept])
        medians.append((i, float(np.median(values[np.isfinite(values)]))))
        shown_values.append(values[shown])
    if not medians:
        ax.text(0.5, 0.5, "no neuron scores", ha="center", va="center", transform=ax.transAxes)
        return
    for is_kept, colour, label in ((False, _TOTAL, "removed"), (True, _KEPT, "kept" if kept is not None else "neurons")):
        if points[is_kept][0]:
            ax.scatter(*points[is_kept], s=4, color=colour, label=label, rasterized=True)
    ax.plot(*zip(*medians), color="#ff7f0e", marker="_", markersize=14, linestyle="none", label="median")
    every = np.concatenate(shown_values)
    if every.min() > 0 and every.max() / every.min() > 1e3:
        ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("score")
    _integer_ticks(ax.xaxis, len(neurons), every_up_to=24)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
