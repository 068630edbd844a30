"""The report's Table I for any study: a row per trial, the hyperparameters that vary, the final metrics.

Trials get letters like the report's models A, B, C: one letter per *variant* (a distinct setting of the
varied hyperparameters, seeds aside), in Tune's grid order; the samples (seeds) of a variant are A.1, A.2.
"""
from __future__ import annotations

import math
import re

import pandas as pd

from analysis.load import Study
from analysis.naming import VariantNames, fmt, letters  # noqa: F401  (letters: the report's names, re-exported)

METRICS = {
    "classification": ("train/loss", "val/loss", "val/accuracy", "val/precision", "val/recall", "val/miou"),
    "segmentation": ("train/loss", "val/loss", "val/accuracy", "val/precision", "val/recall", "val/miou"),
    "generation": ("train/loss", "val/loss", "val/recon", "val/kl", "val/elbo"),
}
RATES = {"val/accuracy", "val/precision", "val/recall", "val/miou"}  # shown as percentages, as Table I
_TRIAL_ID = re.compile(r"_([0-9a-f]{5}_\d{5})(?:_|$)")


def varied_params(trials: pd.DataFrame) -> list[str]:
    """The config columns whose value differs between trials (a missing value counts as a value)."""
    columns = [c for c in trials.columns if c.startswith("config/")]
    return [c for c in columns if trials[c].map(fmt).nunique() > 1]


def short_id(trial: str) -> str:
    """Tune's trial id (``fd294_00002``) out of a trial folder name."""
    found = _TRIAL_ID.search(trial)
    return found.group(1) if found else trial


def label_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """Add ``variant`` (A, B, ...), ``label`` (A or A.1) and ``setting`` (the varied values, for legends)."""
    trials = trials.copy()
    order = sorted(range(len(trials)), key=lambda i: trials["trial"].iloc[i])  # trial index = grid order
    configs = [{c[len("config/"):]: v for c, v in row.items() if c.startswith("config/")}
               for _, row in trials.iterrows()]
    # the runner names MLflow runs with the same letters (analysis/naming.py), from Tune's grid order
    names = VariantNames(configs[i] for i in order)
    varied = [f"config/{key}" for key in names.varied]
    trials["variant"] = [names.letter(config) for config in configs]
    counts = trials["variant"].value_counts()
    seen: dict[str, int] = {}
    labels = {}
    for i in order:
        variant = trials["variant"].iloc[i]
        seen[variant] = seen.get(variant, 0) + 1
        labels[i] = variant if counts[variant] == 1 else f"{variant}.{seen[variant]}"
    trials["label"] = [labels[i] for i in range(len(trials))]
    # a value the variant does not set (Adam's momentum) is left out of its description
    trials["setting"] = [", ".join(f"{c[len('config/'):]}={fmt(row[c])}" for c in varied if fmt(row[c]) != "-")
                         or "base config" for _, row in trials.iterrows()]
    return trials


def ranked(study: Study) -> pd.DataFrame:
    """The labelled trials, OK ones ranked by the study's metric (1 = best), ERROR ones unranked."""
    trials = label_trials(study.trials)
    if study.metric in trials:
        score = trials[study.metric].where(trials["status"].isin(study.rankable))
    else:  # a study whose every trial failed before its first report
        score = pd.Series(float("nan"), index=trials.index)
    # ties keep trials.csv's order, so the one best row is the runner's "best config"
    trials["rank"] = score.rank(ascending=study.mode == "min", method="first")
    trials["best"] = trials["rank"].eq(1)
    return trials


def best_per_variant(study: Study, limit: int | None = None) -> pd.DataFrame:
    """One row per variant: its best OK trial; the ``limit`` best variants, in letter order."""
    trials = ranked(study)
    ok = trials[trials["rank"].notna()].sort_values("rank", kind="stable")
    best = ok.drop_duplicates("variant").head(limit)
    return best.sort_values("variant", key=lambda s: s.map(_label_key), kind="stable")


def results_table(study: Study) -> pd.DataFrame:
    """Table I: label, varied hyperparameters, status, epochs run, final metrics, rank and best mark."""
    trials = ranked(study)
    metrics = [m for m in METRICS.get(study.task, METRICS["segmentation"]) if m in trials and trials[m].notna().any()]
    varied = [c for c in varied_params(trials) if c != "config/data_root"]
    columns = ["label", *varied, "status", "epoch", *metrics, "rank", "best", "trial"]
    if "error" in trials and trials["error"].notna().any():
        columns.append("error")
    table = trials[[c for c in columns if c in trials]].rename(columns=lambda c: c.removeprefix("config/"))
    return table.sort_values("label", key=lambda s: s.map(_label_key), kind="stable").reset_index(drop=True)


def _label_key(label: str):
    variant, _, sample = label.partition(".")
    return (len(variant), variant, int(sample or 0))


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table; rates in %, the best row in bold with a star, errors below."""
    shown = [c for c in table.columns if c not in ("best", "error")]
    rows = []
    for _, row in table.iterrows():
        cells = []
        for column in shown:
            value = row[column]
            if column == "trial":
                value = short_id(value)
            elif column in RATES and isinstance(value, float) and not math.isnan(value):
                value = f"{100 * value:.2f}%"
            elif column == "rank":
                value = "" if pd.isna(value) else f"{int(value)}"
            elif column == "epoch":
                value = "" if pd.isna(value) else f"{int(value)}"
            cells.append(fmt(value))
        if row.get("best"):
            cells = [f"**{cell}**" for cell in cells]
            cells[0] = f"**{row['label']} ★**"
        rows.append(cells)
    lines = ["| " + " | ".join(shown) + " |", "|" + "|".join("---" for _ in shown) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    errors = table[table["status"].eq("ERROR")] if "status" in table else table.iloc[:0]
    for _, row in errors.iterrows():
        lines.append(f"\n{row['label']} ({short_id(row['trial'])}) failed: {fmt(row.get('error'))}")
    return "\n".join(lines) + "\n"


def pareto_front(trials: pd.DataFrame, goals: list[tuple[str, str]]) -> pd.DataFrame:
    """The finished trials no other finished trial beats on every objective (and strictly on one); ``goals``:
    (metric, "min" | "max") pairs."""
    if not all(metric in trials for metric, _ in goals):
        return trials.iloc[:0]
    ok = trials[(trials["status"] == "OK") & trials[[m for m, _ in goals]].notna().all(axis=1)]
    signed = pd.DataFrame({m: ok[m] if d == "max" else -ok[m] for m, d in goals})  # larger is better on both
    keep = [i for i in signed.index if not any((signed.loc[j] >= signed.loc[i]).all() and
                                               (signed.loc[j] > signed.loc[i]).any() for j in signed.index if j != i)]
    return ok.loc[keep]
