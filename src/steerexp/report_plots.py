"""The figures of `steerexp-report` (matplotlib, Agg backend), each returned as PNG bytes:

    panels_png      metrics against one x (a swept parameter, a strength, a method), one panel per
                    metric, one series per line, with CI bars (95% bootstrap over images)
    histogram_png   overlaid score distributions (baseline vs edited) with axes and a legend

Points are plain data (`Point`), so the same numbers go to the HTML page, the CSV and W&B charts.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f")
SIDE_COLOURS = {"baseline": "#7f7f7f", "edited": "#d62728"}


@dataclass
class Point:
    x: float | str
    value: float
    lo: float | None = None   # CI bounds; None when the run kept no per-image values for this metric
    hi: float | None = None


@dataclass
class Panel:
    title: str                                                  # the metric
    series: dict[str, list[Point]]                              # label -> points
    reference: dict[str, list[Point]] = field(default_factory=dict)   # drawn dashed grey (e.g. the baseline)
    hline: tuple[float, str] | None = None                      # (y, label), e.g. a tolerance
    marks: list[tuple[float | str, float, str]] = field(default_factory=list)   # (x, y, label): stars


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return buf.getvalue()


def categories_of(panels: list[Panel]) -> list[str] | None:
    """The x categories in first-seen order, or None when every x is a number (a numeric axis)."""
    xs = [p.x for panel in panels for pts in [*panel.series.values(), *panel.reference.values()] for p in pts]
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
        return None
    return list(dict.fromkeys(str(x) for x in xs))


def _draw(ax, pts: list[Point], categories, offset: float, **style) -> None:
    pts = sorted(pts, key=lambda p: categories.index(str(p.x)) if categories else p.x)
    xs = [categories.index(str(p.x)) + offset if categories else p.x for p in pts]
    ys = np.array([p.value for p in pts], float)
    lo = np.array([p.value - p.lo if p.lo is not None else 0.0 for p in pts])
    hi = np.array([p.hi - p.value if p.hi is not None else 0.0 for p in pts])
    ax.errorbar(xs, ys, yerr=np.maximum(np.stack([lo, hi]), 0), capsize=3, markersize=5, lw=1.4, **style)


def panels_png(panels: list[Panel], xname: str, title: str = "", logx: bool = False, columns: int = 3) -> bytes:
    """One panel per metric against `xname`; categorical x (methods, modes) when any x is a string."""
    plt = _pyplot()
    categories = categories_of(panels)
    cols = min(columns, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.2 * rows + 0.6), squeeze=False)
    labels = list(dict.fromkeys(label for p in panels for label in p.series))
    colour = {label: COLOURS[i % len(COLOURS)] for i, label in enumerate(labels)}
    width = 0.5 if categories else 0.0
    for ax, panel in zip(axes.flat, panels):
        n = max(1, len(panel.series) + len(panel.reference))
        offsets = iter(np.linspace(-width / 2, width / 2, n) if n > 1 else [0.0])
        for label, pts in panel.reference.items():
            _draw(ax, pts, categories, next(offsets), fmt="s--" if not categories else "s", color="#7f7f7f",
                  label=label, alpha=0.8)
        for label, pts in panel.series.items():
            _draw(ax, pts, categories, next(offsets), fmt="o-" if not categories else "o", color=colour[label],
                  label=label)
        if panel.hline is not None:
            ax.axhline(panel.hline[0], color="#555555", lw=0.9, ls=":", label=panel.hline[1])
        for x, y, label in panel.marks:
            ax.plot([categories.index(str(x)) if categories else x], [y], "*", color="black", markersize=13,
                    label=label, zorder=5)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(xname, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if categories:
            ax.set_xticks(range(len(categories)))
            ax.set_xticklabels(categories, rotation=25 if max(map(len, categories)) > 6 else 0, ha="right"
                               if max(map(len, categories)) > 6 else "center")
            ax.set_xlim(-0.6, len(categories) - 0.4)
        else:
            xs = sorted({p.x for pts in panel.series.values() for p in pts})
            if logx:
                ax.set_xscale("log", base=2)
            if len(xs) <= 10:  # ticks at the values run
                ax.set_xticks(xs)
                ax.set_xticklabels([f"{x:g}" for x in xs])
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles, names = {}, []
    for ax in axes.flat:
        for h, name in zip(*ax.get_legend_handles_labels()):
            if name not in handles:
                handles[name] = h
                names.append(name)
    if title:
        fig.suptitle(title, fontsize=11)
    legend_rows = math.ceil(len(names) / 4)
    fig.legend([handles[n] for n in names], names, loc="lower center", ncol=min(4, len(names)), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, min(0.45, (0.28 * legend_rows + 0.1) / fig.get_figheight()), 1, 1))
    return _png(fig)


def histogram_png(series: dict[str, list[float]], xlabel: str, title: str = "", bins: int = 20,
                  unit_range: bool = False, threshold: float | None = None) -> bytes:
    """Overlaid histograms of each side's values (same bins), each labelled with n and its mean."""
    plt = _pyplot()
    values = {side: np.asarray(v, float) for side, v in series.items() if len(v)}
    everything = np.concatenate(list(values.values())) if values else np.zeros(1)
    lo, hi = (0.0, 1.0) if unit_range else (float(everything.min()), float(everything.max()))
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    fig, ax = plt.subplots(figsize=(4.6, 2.9))
    for i, (side, v) in enumerate(values.items()):
        colour = SIDE_COLOURS.get(side, COLOURS[i % len(COLOURS)])
        ax.hist(np.clip(v, lo, hi), bins=edges, color=colour, alpha=0.45,
                label=f"{side} (n={len(v)}, mean {v.mean():.3g})")
        ax.hist(np.clip(v, lo, hi), bins=edges, color=colour, histtype="step", lw=1.2)
    if threshold is not None:
        ax.axvline(threshold, color="black", lw=0.9, ls=":", label=f"threshold {threshold:g}")
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("images", fontsize=9)
    ax.tick_params(labelsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)
