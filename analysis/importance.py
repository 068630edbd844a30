"""Hyperparameter importance over a study's finished trials, as the Optuna dashboard and W&B sweeps show it.

The trials table becomes an in-memory Optuna study (``optuna.trial.create_trial``), each varied hyperparameter
with a distribution read off its values: numbers as float or int ranges (log scale when they span a factor of 8
or more, as learning rates and latent sizes are swept), anything else, or a number some trial lacks, as a
category. Optuna's fANOVA (a random forest's variance decomposition; seed fixed, so a page rebuilt gives the same
numbers) or PED-ANOVA (what it takes to reach the top 10%) then apportions the metric's variation.

Only trials that ran their whole budget count: a trial a scheduler (ASHA) stopped reports an earlier epoch's
metric, which Optuna itself would mark PRUNED and leave out.
"""
from __future__ import annotations

import html
import itertools
import logging
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.naming import fmt

EVALUATORS = ("fanova", "ped-anova")
MIN_TRIALS = 10  # fANOVA's forest fitted to fewer points describes those points, not the parameters
MIN_PARAMS = 2  # with one parameter its share is 1 by construction
PED_ANOVA_QUANTILE = 0.1  # PED-ANOVA's default target: the top 10% of trials
PED_ANOVA_TOP = 5  # Optuna's advice: at least 5 trials in that top quantile, so 50 trials at 10%
LOG_SPAN = 8  # a positive range this wide (max/min) is read on a log scale
NAMES = {"fanova": "fANOVA", "ped-anova": "PED-ANOVA"}


@dataclass
class Importance:
    """Each varied hyperparameter's share of the metric's variation (``table``), or why there is none (``reason``)."""

    evaluator: str
    trials: int  # finished trials used
    left_out: list = field(default_factory=list)  # OK trials stopped before their budget
    table: pd.DataFrame = field(default_factory=pd.DataFrame)  # param, importance, distribution
    reason: str | None = None
    confounded: list = field(default_factory=list)  # pairs of params that vary together in these trials


def min_trials(evaluator: str) -> int:
    return math.ceil(PED_ANOVA_TOP / PED_ANOVA_QUANTILE) if evaluator == "ped-anova" else MIN_TRIALS


def finished(trials: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, list]:
    """The OK trials with a finite metric that ran every epoch of their budget, and the names of those that did not."""
    ok = trials[trials["status"].eq("OK")] if "status" in trials else trials
    ok = ok[np.isfinite(pd.to_numeric(ok.get(metric, pd.Series(index=ok.index, dtype=float)), errors="coerce"))]
    if "epoch" not in ok or "config/epochs" not in ok:
        return ok, []
    stopped = pd.to_numeric(ok["epoch"], errors="coerce") < pd.to_numeric(ok["config/epochs"], errors="coerce")
    return ok[~stopped], list(ok.loc[stopped, "trial"])


def is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def distribution(values: pd.Series):
    """An Optuna distribution for one column's values, and the values as that distribution's params."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if values.notna().all() and all(is_number(v) for v in values):
        numbers = values.astype(float)
        low, high = float(numbers.min()), float(numbers.max())
        log = low > 0 and high >= LOG_SPAN * low
        if (numbers % 1 == 0).all() and not (log and low < 1):
            return IntDistribution(int(low), int(high), log=log), [int(v) for v in numbers]
        return FloatDistribution(low, high, log=log), list(numbers)
    texts = [fmt(v) for v in values]  # a category per value; a missing one is "-"
    return CategoricalDistribution(sorted(set(texts))), texts


def confounded(trials: pd.DataFrame, params: list[str]) -> list[tuple[str, str]]:
    """Pairs of params whose values determine each other in these trials (a grid of optimizer dicts varies name,
    lr and momentum together): their shares cannot be told apart."""
    texts = {p: trials[p].map(fmt) for p in params}
    return [(a, b) for a, b in itertools.combinations(params, 2)
            if texts[a].nunique() == texts[b].nunique() == pd.Series(zip(texts[a], texts[b])).nunique()]


def param_importance(trials: pd.DataFrame, params: list[str], metric: str, mode: str,
                     evaluator: str = "fanova") -> Importance:
    """Importance of ``params`` (trials' ``config/...`` columns) for ``metric`` over the finished trials."""
    if evaluator not in EVALUATORS:
        raise ValueError(f"importance evaluator {evaluator!r}: choose one of {', '.join(EVALUATORS)}")
    done, left_out = finished(trials, metric)
    varied = [p for p in params if p in done and done[p].map(fmt).nunique() > 1]
    result = Importance(evaluator, len(done), left_out)
    need = min_trials(evaluator)
    stopped = f" ({len(left_out)} more stopped early by the scheduler, left out)" if left_out else ""
    if len(done) < need:
        result.reason = (f"{len(done)} finished trial(s){stopped}: {NAMES[evaluator]} needs at least {need} to say "
                         "which hyperparameters matter")
    elif len(varied) < MIN_PARAMS:
        names = ", ".join(p.removeprefix("config/") for p in varied) or "none"
        result.reason = (f"{len(varied)} hyperparameter(s) vary over the {len(done)} finished trials ({names}): "
                         f"importance needs at least {MIN_PARAMS} to compare")
    if result.reason:
        return result
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    columns = {p: distribution(done[p]) for p in varied}
    for i, value in enumerate(pd.to_numeric(done[metric]).astype(float)):
        study.add_trial(optuna.trial.create_trial(
            params={p: values[i] for p, (_, values) in columns.items()},
            distributions={p: dist for p, (dist, _) in columns.items()}, value=value))
    chosen = (optuna.importance.FanovaImportanceEvaluator(seed=0) if evaluator == "fanova" else
              optuna.importance.PedAnovaImportanceEvaluator(target_quantile=PED_ANOVA_QUANTILE))
    with warnings.catch_warnings():  # PED-ANOVA is experimental; its warnings go to the log, not the console
        warnings.simplefilter("ignore")
        shares = optuna.importance.get_param_importances(study, evaluator=chosen, params=varied)
    logging.getLogger(__name__).debug("%s importances: %s", evaluator, shares)
    result.table = pd.DataFrame([{"param": p.removeprefix("config/"), "importance": share,
                                  "distribution": _describe(columns[p][0])} for p, share in shares.items()])
    result.confounded = [(a.removeprefix("config/"), b.removeprefix("config/")) for a, b in confounded(done, varied)]
    return result


def _describe(dist) -> str:
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return "categorical: " + ", ".join(map(str, dist.choices))
    kind = type(dist).__name__.removesuffix("Distribution").lower()
    return f"{kind} {fmt(dist.low)}..{fmt(dist.high)}" + (" (log)" if dist.log else "")


def not_computed(result: Importance) -> str:
    """The page's plain note when there is no importance to show, with the thresholds."""
    return (f"Hyperparameter importance not computed: {result.reason}. Thresholds: at least "
            f"{min_trials(result.evaluator)} trials that ran their whole budget and {MIN_PARAMS} hyperparameters that "
            "vary among them.")


def importance_caption(result: Importance, metric: str) -> str:
    left = f"; {len(result.left_out)} stopped early left out" if result.left_out else ""
    caveat = "".join(f" {a} and {b} vary together in these trials: their shares cannot be told apart."
                     for a, b in result.confounded)
    return (f"{NAMES[result.evaluator]} importance of each varied hyperparameter for {metric} over the {result.trials} "
            f"trials that ran their whole budget{left} (Optuna; the shares sum to 1; distributions read off the "
            f"values).{caveat}")


def _rows(result: Importance) -> list[tuple[str, str, str]]:
    return [(r["param"], f"{r['importance']:.3f}", r["distribution"]) for _, r in result.table.iterrows()]


def importance_markdown(result: Importance) -> str:
    if result.reason:
        return not_computed(result) + "\n"
    lines = ["| param | importance | distribution |", "|---|---|---|"]
    return "\n".join(lines + [f"| {' | '.join(row)} |" for row in _rows(result)]) + "\n"


def importance_html(result: Importance) -> str:
    if result.reason:
        return f"<p>{html.escape(not_computed(result))}</p>"
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in _rows(result))
    return f"<table><tr><th>param</th><th>importance</th><th>distribution</th></tr>{cells}</table>"
