"""Statistics over seeds: variants of a trials table, mean ± std per variant, 95% intervals (Welch's t).

Pure functions of a trials table (one row per trial: ``status``, ``config/...`` and metric columns, as the
runner's ``trials.csv``), so the runner's end of study and ``analysis/`` judge a study with the same numbers.
How a finding's verdict combines these intervals (multiplicity, minimum difference) is ``analysis.finding``'s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis import naming

CONFIDENCE = 0.95
# the variant table's interval of each variant against the best by mean: descriptive, no correction for the pick
METHOD = "Welch t over seeds, 95%, unadjusted"
# Repeated samples of one setting differ by these only; they never define a variant (one list, with the names)
NOT_A_VARIANT = tuple(f"config/{key}" for key in sorted(naming.NOT_A_VARIANT))


@dataclass(frozen=True)
class Interval:
    """An estimate (a difference of means, or a slope) with its two-sided interval."""

    estimate: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def beyond(self, margin: float, sign: int) -> bool:
        """The whole interval lies past ``margin`` in the direction ``sign`` (+1: above +margin, -1: below -margin):
        the difference is at least ``margin``, not merely non-zero."""
        return self.low > margin if sign > 0 else self.high < -margin

    def scaled(self, factor: float) -> "Interval":
        """The interval of ``factor`` times the estimate (a slope per unit -> the change over a span)."""
        ends = sorted((self.low * factor, self.high * factor))
        return Interval(self.estimate * factor, *ends)

    def text(self, digits: int = 4) -> str:
        return f"{self.estimate:+.{digits}g} [{self.low:+.{digits}g}, {self.high:+.{digits}g}]"


def welch_interval(a, b, confidence: float = CONFIDENCE) -> Interval | None:
    """mean(a) - mean(b) with Welch's t interval (unequal variances); None unless both have n >= 2."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return None
    var_a, var_b = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff, se = a.mean() - b.mean(), math.sqrt(var_a + var_b)
    if se == 0:  # identical repeats: no spread to scale by, the difference is exact
        return Interval(diff, diff, diff)
    # Welch-Satterthwaite degrees of freedom
    df = (var_a + var_b) ** 2 / (var_a ** 2 / (len(a) - 1) + var_b ** 2 / (len(b) - 1))
    half = _t_quantile((1 + confidence) / 2, df) * se
    return Interval(diff, diff - half, diff + half)


def slope_interval(x, y, confidence: float = CONFIDENCE) -> Interval | None:
    """Least-squares slope of y on x with its t interval; None with fewer than 3 points or one x value."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0:
        return None
    from scipy.stats import linregress

    fit = linregress(x, y)
    half = _t_quantile((1 + confidence) / 2, len(x) - 2) * fit.stderr
    return Interval(fit.slope, fit.slope - half, fit.slope + half)


def _t_quantile(q: float, df: float) -> float:
    # scipy is imported here, not above: scipy.stats costs 1.2 s, and every trial's worker imports this package;
    # stdtrit is the kernel under t.ppf, some 50x faster without its checks (judge() runs in simulations)
    from scipy.special import stdtrit

    return float(stdtrit(df, q))


def _cell(value) -> str:
    """A config value as a grouping key: missing -> '-', floats without noise (0.1 == 0.10000000001)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def variant_columns(trials: pd.DataFrame) -> list[str]:
    """The config columns that vary between trials, seeds aside: together they name a variant."""
    columns = [c for c in trials.columns if c.startswith("config/") and c not in NOT_A_VARIANT]
    return [c for c in columns if trials[c].map(_cell).nunique() > 1]


def variant_keys(trials: pd.DataFrame) -> pd.Series:
    """Per trial, its variant as text ('model=resnet18, optim/lr=0.05'; 'base config' if nothing varies)."""
    keys = pd.Series("base config", index=trials.index)
    for index, column in enumerate(variant_columns(trials)):  # column by column: judge() runs in simulations
        part = f"{column.removeprefix('config/')}=" + trials[column].map(_cell).astype(str)
        keys = part if index == 0 else keys + ", " + part
    return keys


def full_budget(trials: pd.DataFrame) -> tuple[pd.DataFrame, list]:
    """The trials that ran their whole budget, and the names of the OK ones a scheduler (ASHA) stopped before it:
    their ``epoch`` is below their ``config/epochs``, so their metrics are an earlier epoch's."""
    if "epoch" not in trials or "config/epochs" not in trials:
        return trials, []
    ok = trials["status"].eq("OK") if "status" in trials else pd.Series(True, index=trials.index)
    ran, budget = (pd.to_numeric(trials[c], errors="coerce") for c in ("epoch", "config/epochs"))
    stopped = ok & (ran < budget)  # NaN on either side compares False: a trial that cannot tell is kept
    names = list(trials.loc[stopped, "trial"]) if "trial" in trials else [str(i) for i in trials.index[stopped]]
    return trials[~stopped], names


@dataclass(frozen=True)
class VariantStats:
    """One variant's final values of one metric over its OK trials (one per seed)."""

    key: str
    values: np.ndarray

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(self.values.mean()) if self.n else math.nan

    @property
    def std(self) -> float:
        return float(self.values.std(ddof=1)) if self.n > 1 else math.nan

    def text(self, digits: int = 4) -> str:
        spread = f" ± {self.std:.{digits}g}" if self.n > 1 else ""
        return f"{self.mean:.{digits}g}{spread} (n={self.n})"


def per_variant(trials: pd.DataFrame, metric: str, keys: pd.Series | None = None) -> dict[str, VariantStats]:
    """Each variant's final ``metric`` over its OK trials, in first-seen order (variants without any left out);
    ``keys``: the trials' ``variant_keys``, where the caller has them already."""
    ok = trials["status"].eq("OK") if "status" in trials else pd.Series(True, index=trials.index)
    keys = variant_keys(trials) if keys is None else keys
    values = pd.to_numeric(trials[metric], errors="coerce") if metric in trials else pd.Series(math.nan, trials.index)
    chosen = values[ok].dropna()
    found = {key: group.to_numpy(dtype=float) for key, group in chosen.groupby(keys[chosen.index], sort=False)}
    return {key: VariantStats(key, found[key]) for key in dict.fromkeys(keys) if key in found}


def best_key(groups: dict[str, VariantStats], mode: str) -> str:
    """The variant with the best mean (``mode`` max or min); ties keep the first."""
    sign = 1 if mode == "max" else -1
    return max(groups, key=lambda key: sign * groups[key].mean)
