"""Plots of numbers: learning curves (Fig. 6), confusion matrices (Fig. 8), t-SNE/PCA scatters (Figs. 10-11),
final loss against one hyperparameter (section III). Each function returns a matplotlib Figure."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers, the same output everywhere
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from trainables.data.voc import voc_palette  # noqa: E402

CURVES = {  # panel title -> metrics drawn in it (solid, dashed)
    "classification": {"loss": ("train/loss", "val/loss"), "accuracy": ("val/accuracy",),
                       "precision": ("val/precision",)},
    "generation": {"loss": ("train/loss", "val/loss"), "reconstruction": ("val/recon",), "KL": ("val/kl",)},
}
CURVES["segmentation"] = {**CURVES["classification"], "mIoU": ("val/miou",)}
STYLES = ("-", "--", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def save(figure: plt.Figure, path: Path, dpi: int = 110) -> Path:
    """Write a PNG and free the figure (long reports would otherwise keep every figure in memory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(figure)
    return path


def class_colors(count: int, segmentation: bool) -> np.ndarray:
    """(count, 3) colours in [0, 1]: VOC's palette for segmentation (as the masks), tab10/tab20 otherwise."""
    if segmentation:
        return np.asarray(voc_palette()[: 3 * count], dtype=float).reshape(count, 3) / 255
    cmap = plt.get_cmap("tab10" if count <= 10 else "tab20")
    return np.asarray([cmap(i % cmap.N)[:3] for i in range(count)])


def _panels(curves: pd.DataFrame, task: str) -> dict[str, list[str]]:
    """The task's panels that have data: panel title -> the metrics drawn in it."""
    panels = {name: [m for m in metrics if m in curves and curves[m].notna().any()]
              for name, metrics in CURVES.get(task, CURVES["classification"]).items()}
    return {name: metrics for name, metrics in panels.items() if metrics}


def learning_curves(curves: pd.DataFrame, legend: dict[str, str], task: str, title: str,
                    groups: dict[str, list[str]] | None = None) -> plt.Figure:
    """One panel per measure, a colour per trial (or per group of trials: the seeds of a variant, drawn as
    their mean with a band from their minimum to maximum) and a line style per split (train solid, val dashed)."""
    groups = groups if groups is not None else {label: [trial] for trial, label in legend.items()}
    panels = _panels(curves, task)
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    palette = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")

    def colors(i: int):
        return palette(i % palette.N)

    for ax, (name, metrics) in zip(axes[0], panels.items()):
        for i, trials in enumerate(groups.values()):
            rows = curves[curves["trial"].isin(trials)]
            for metric, style in zip(metrics, STYLES):
                by_epoch = rows.groupby("epoch")[metric]
                mean = by_epoch.mean()
                ax.plot(mean.index, mean.values, style, color=colors(i), markersize=3,
                        marker="o" if len(mean) < 12 else None)
                if len(trials) > 1 and len(mean) > 1:  # the seeds' spread
                    ax.fill_between(mean.index, by_epoch.min().values, by_epoch.max().values, color=colors(i),
                                    alpha=0.18, linewidth=0)
                elif len(trials) > 1:  # one epoch: a band would be invisible, a bar shows the same spread
                    ax.vlines(mean.index, by_epoch.min().values, by_epoch.max().values, color=colors(i), alpha=0.5)
        ax.set(title=name, xlabel="epoch", ylabel=" / ".join(metrics))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    # one entry per trial or variant (its colour), then one per line style (which split)
    handles = [Line2D([], [], color=colors(i), label=label) for i, label in enumerate(groups)]
    handles += [Line2D([], [], color="0.3", linestyle=style, label=split)
                for split, style in (("train", "-"), ("val", "--"))]
    figure.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, len(handles)),
                  fontsize=8, frameon=False)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def trial_curves(curves: pd.DataFrame, variant_of: dict[str, str], legend: dict[str, str], failed: set[str],
                 task: str, title: str, max_legend: int = 20) -> plt.Figure:
    """Every trial's own curves, a colour per variant (``legend``: variant -> text, in colour order), train solid and
    val dashed; a failed trial's last report marked x. Shows what a mean over seeds hides: the spread, and the
    trials a scheduler stopped early."""
    panels = _panels(curves, task)
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    palette = plt.get_cmap("tab10" if len(legend) <= 10 else "tab20")
    color = {variant: palette(i % palette.N) for i, variant in enumerate(legend)}
    for ax, (name, metrics) in zip(axes[0], panels.items()):
        for trial, rows in curves.groupby("trial", sort=False):
            for metric, style in zip(metrics, STYLES):
                points = rows[["epoch", metric]].dropna()
                ax.plot(points["epoch"], points[metric], style, color=color[variant_of[trial]], linewidth=1,
                        alpha=0.75, marker="o" if len(points) == 1 else None, markersize=3)
                if trial in failed and len(points):
                    ax.plot(points["epoch"].iloc[-1], points[metric].iloc[-1], "x", color="black", markersize=6)
        ax.set(title=name, xlabel="epoch", ylabel=" / ".join(metrics))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    shown = list(legend.items())[:max_legend]
    handles = [Line2D([], [], color=color[variant], label=text) for variant, text in shown]
    if len(legend) > max_legend:
        handles.append(Line2D([], [], color="white", label=f"... and {len(legend) - max_legend} more variants"))
    handles += [Line2D([], [], color="0.3", linestyle=style, label=split)
                for split, style in (("train", "-"), ("val", "--"))]
    if failed:
        handles.append(Line2D([], [], color="black", marker="x", linestyle="none", label="failed: last report"))
    figure.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, len(handles)),
                  fontsize=8, frameon=False)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def confusion_matrices(panels: Sequence[tuple[str, np.ndarray]], class_names: Sequence[str], title: str) -> plt.Figure:
    """Counts on a log colour scale (counts + 1, so empty cells show), x = predicted, y = expected."""
    columns = 2 if len(panels) == 4 else min(3, len(panels))
    rows = -(-len(panels) // columns)
    size = 2.2 + 0.28 * len(class_names)
    figure, axes = plt.subplots(rows, columns, figsize=(size * columns + 1.2, size * rows + 0.6), squeeze=False,
                                layout="constrained")
    top = max(int(matrix.max()) for _, matrix in panels) + 1
    norm = LogNorm(vmin=1, vmax=max(top, 2))
    image = None
    for ax, (name, matrix) in zip(axes.flat, panels):
        image = ax.imshow(matrix + 1, norm=norm, cmap="viridis", interpolation="nearest")
        ticks = np.arange(len(class_names))
        ax.set_xticks(ticks, class_names, rotation=90 if max(map(len, class_names)) > 2 else 0, fontsize=7)
        ax.set_yticks(ticks, class_names, fontsize=7)
        ax.set(xlabel="predicted class", ylabel="expected class", title=name)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="count + 1 (log scale)")
    figure.suptitle(title)
    return figure


def embeddings(panels: Sequence[tuple[str, np.ndarray]], labels: np.ndarray, class_names: Sequence[str],
               segmentation: bool, title: str) -> plt.Figure:
    """A scatter per feature tap, points coloured by class, one shared legend of the classes present."""
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 4.0 * rows), squeeze=False)
    colors = class_colors(len(class_names), segmentation)
    present = np.unique(labels)
    for ax, (name, points) in zip(axes.flat, panels):
        for k in present:
            chosen = labels == k
            # markers as well as colours: several of VOC's 21 colours are close (greens, browns)
            ax.scatter(points[chosen, 0], points[chosen, 1], s=16, color=colors[k], edgecolors="0.3",
                       linewidths=0.3, marker=MARKERS[k % len(MARKERS)], label=class_names[k])
        ax.set(title=name, xlabel="component 1", ylabel="component 2")
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title="class",
                  frameon=False)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def final_vs_param(table: pd.DataFrame, param: str, metrics: Sequence[str], title: str) -> plt.Figure:
    """Final metrics of the OK trials against one numeric hyperparameter (log x for learning rates)."""
    ok = table[table["status"].eq("OK")].copy()
    ok[param] = pd.to_numeric(ok[param], errors="coerce")
    ok = ok.dropna(subset=[param]).sort_values(param)
    metrics = [m for m in metrics if m in ok and ok[m].notna().any()]
    figure, axes = plt.subplots(1, len(metrics), figsize=(3.8 * len(metrics), 3.4), squeeze=False)
    # trials an ASHA scheduler stopped early report an earlier, higher loss: drawn hollow, not averaged in
    full = ok["epoch"].eq(ok["epoch"].max()) if "epoch" in ok else pd.Series(True, index=ok.index)
    for ax, metric in zip(axes[0], metrics):
        means = ok[full].groupby(param)[metric].mean()
        ax.plot(ok.loc[full, param], ok.loc[full, metric], "o", alpha=0.6, color="tab:blue", label="trial")
        if not full.all():
            ax.plot(ok.loc[~full, param], ok.loc[~full, metric], "o", mfc="none", color="tab:red",
                    label="stopped early")
            ax.legend(fontsize=7)
        ax.plot(means.index, means.values, "-", color="tab:blue")
        if (ok[param] > 0).all() and ok[param].max() >= 8 * ok[param].min():  # lr 1e-4..1e-2, latent 2..64
            integers = bool((ok[param] % 1 == 0).all())
            ax.set_xscale("log", base=2 if integers else 10)
            if integers:  # latent sizes read as 2, 4, ... 64, not 2^1 ... 2^6
                values = sorted(ok[param].unique())
                ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.set(xlabel=param, ylabel=f"final {metric}", title=metric)
        ax.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    return figure
