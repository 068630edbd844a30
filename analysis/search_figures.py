"""Plots across a search's trials, as W&B sweeps and the Optuna dashboard draw them: parallel coordinates of the
varied hyperparameters to the metric, and hyperparameter importance. Each function returns a matplotlib Figure."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import pyplot as plt
from matplotlib.colors import Normalize
from matplotlib.lines import Line2D

from analysis import figures  # noqa: F401  (selects the Agg backend before pyplot draws anything)
from analysis.importance import LOG_SPAN, is_number
from analysis.naming import fmt

MISSING_AT = -0.12  # where a trial without a value (failed, or a param its variant lacks) meets an axis
MAX_LABELS = 12  # trial labels beside the metric axis up to this many trials; more would overlap


def axis_positions(values: pd.Series) -> tuple[np.ndarray, list[tuple[float, str]], str]:
    """Values -> heights in [0, 1] (missing: MISSING_AT), the axis' ticks and its kind (linear, log, categorical)."""
    present = values.dropna()
    if len(present) and all(is_number(v) for v in present):
        numbers = values.astype(float)
        low, high = float(present.min()), float(present.max())
        log = low > 0 and high >= LOG_SPAN * low
        scale = np.log10 if log else (lambda x: x)
        span = scale(high) - scale(low)
        heights = (scale(numbers) - scale(low)) / span if span else numbers * 0 + 0.5
        distinct = sorted(present.astype(float).unique())
        shown = distinct if len(distinct) <= 6 else [float(v) for v in
                                                     (10 ** np.linspace(np.log10(low), np.log10(high), 5) if log
                                                      else np.linspace(low, high, 5))]
        ticks = [(float((scale(v) - scale(low)) / span) if span else 0.5, fmt(v)) for v in shown]
        kind = "log" if log else "linear"
    else:
        texts = values.map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v)) else fmt(v))
        categories = sorted(texts.dropna().unique(), key=str)
        where = {c: (i / (len(categories) - 1) if len(categories) > 1 else 0.5) for i, c in enumerate(categories)}
        heights = texts.map(where).astype(float)
        ticks, kind = [(where[c], c) for c in categories], "categorical"
    heights = np.where(np.isnan(np.asarray(heights, dtype=float)), MISSING_AT, heights)
    if (heights == MISSING_AT).any():
        ticks.append((MISSING_AT, "-"))
    return heights, ticks, kind


def parallel_coordinates(trials: pd.DataFrame, params: list[str], metric: str, mode: str, title: str) -> plt.Figure:
    """An axis per hyperparameter (``config/...`` columns) and one for the metric; a line per trial, coloured by its
    metric (bright = better); trials that did not finish OK dashed, grey when they reported no metric."""
    columns = [*params, metric]
    axes_data = [axis_positions(trials[c] if c in trials else pd.Series([np.nan] * len(trials))) for c in columns]
    scores = pd.to_numeric(trials[metric], errors="coerce").to_numpy(dtype=float) if metric in trials else \
        np.full(len(trials), np.nan)
    known = scores[np.isfinite(scores)]
    norm = Normalize(known.min(), known.max()) if len(known) and known.min() < known.max() else Normalize(0, 1)
    cmap = plt.get_cmap("viridis" if mode == "max" else "viridis_r")
    figure, ax = plt.subplots(figsize=(1.9 * len(columns) + 2.6, 4.6))
    xs = np.arange(len(columns))
    order = np.argsort(np.where(np.isfinite(scores), scores if mode == "max" else -scores, -np.inf))
    for i in order:  # worst first, so the best trials are drawn on top
        heights = [data[0][i] for data in axes_data]
        ok = trials["status"].iloc[i] == "OK" if "status" in trials else True
        color = cmap(norm(scores[i])) if np.isfinite(scores[i]) else "0.6"
        ax.plot(xs, heights, "-" if ok else "--", color=color, linewidth=1.6 if ok else 1.1, alpha=0.85,
                marker="o", markersize=3)
        if len(trials) <= MAX_LABELS and "label" in trials:
            ax.annotate(str(trials["label"].iloc[i]), (xs[-1], heights[-1]), xytext=(6, 0), textcoords="offset points",
                        fontsize=7, va="center", color="0.25")
    for x, (heights, ticks, kind) in zip(xs, axes_data):
        ax.axvline(x, color="0.35", linewidth=0.8)
        for y, text in ticks:
            ax.text(x - 0.04, y, text, ha="right", va="center", fontsize=7,
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 0.5})
    names = [c.removeprefix("config/") for c in columns]
    kinds = [kind for _, _, kind in axes_data]
    ax.set_xticks(xs, [f"{n}\n({k})" for n, k in zip(names, kinds)], fontsize=8)
    ax.set_xlim(-0.6, xs[-1] + 0.5)
    ax.set_ylim(MISSING_AT - 0.08, 1.08)
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    mappable = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    figure.colorbar(mappable, ax=ax, pad=0.02, label=f"{metric} ({mode}; bright = better)")
    handles = [Line2D([], [], color="0.3", linestyle="-", label="finished OK"),
               Line2D([], [], color="0.3", linestyle="--", label="stopped, failed or unfinished")]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
    ax.set_title(title)
    figure.tight_layout()
    return figure


def importance_bars(table: pd.DataFrame, evaluator: str, metric: str, title: str) -> plt.Figure:
    """Horizontal bars of each hyperparameter's share (they sum to 1), the largest on top."""
    table = table.sort_values("importance")
    figure, ax = plt.subplots(figsize=(6.4, 1.0 + 0.42 * len(table)))
    bars = ax.barh(table["param"], table["importance"], color="tab:blue")
    ax.bar_label(bars, [f"{v:.2f}" for v in table["importance"]], padding=3, fontsize=8)
    ax.set(xlim=(0, 1.12), xlabel=f"importance for {metric} ({evaluator}; the shares sum to 1)", title=title)
    ax.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    return figure


def pareto(trials: pd.DataFrame, front: pd.DataFrame, goals: list[tuple[str, str]], title: str) -> plt.Figure:
    """Every finished trial on the two objectives, the Pareto front joined and labelled."""
    (x, x_mode), (y, y_mode) = goals
    figure, ax = plt.subplots(figsize=(6.4, 4.8))
    ok = trials[(trials["status"] == "OK") & trials[[x, y]].notna().all(axis=1)]
    ax.scatter(ok[x], ok[y], color="0.7", label="trials")
    ordered = front.sort_values(x)
    ax.plot(ordered[x], ordered[y], "o-", color="C3", label="Pareto front")
    for _, row in ordered.iterrows():
        ax.annotate(str(row.get("name", row["trial"])), (row[x], row[y]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xlabel(f"{x} ({x_mode})")
    ax.set_ylabel(f"{y} ({y_mode})")
    ax.set_title(title)
    ax.legend()
    figure.tight_layout()
    return figure


def lineage(rows: pd.DataFrame, param: str, title: str) -> plt.Figure:
    """A row per trial along its epochs, coloured by ``param``'s value (log scale), an arrow from the trial and
    epoch whose checkpoint a trial copied to where it continued (PBT's exploit)."""
    from matplotlib.colors import LogNorm

    trials = sorted(rows["trial"].unique())
    level = {trial: index for index, trial in enumerate(trials)}
    values = pd.to_numeric(rows[param], errors="coerce")
    norm = LogNorm(values.min(), values.max()) if values.min() > 0 and values.max() > values.min() else None
    figure, ax = plt.subplots(figsize=(8, 0.5 * len(trials) + 1.8))
    points = ax.scatter(rows["epoch"], rows["trial"].map(level), c=values, cmap="viridis", norm=norm, s=60, zorder=3)
    for _, row in rows[rows["restored_from"].isin(level) & (rows["restored_from"] != rows["trial"])].iterrows():
        ax.annotate("", xy=(row["epoch"], level[row["trial"]]),
                    xytext=(row["restored_epoch"], level[row["restored_from"]]),
                    arrowprops={"arrowstyle": "->", "color": "C3", "alpha": 0.7})
    ax.set_yticks(range(len(trials)), trials, fontsize=7)
    ax.set_xlabel("epoch")
    figure.colorbar(points, ax=ax, label=param)
    ax.set_title(title)
    figure.tight_layout()
    return figure
