"""Statistics over seeds: variants of a trials table, mean ± std per variant, 95% intervals (Welch's t).

Pure functions of a trials table (one row per trial: ``status``, ``config/...`` and metric columns, as the
runner's ``trials.csv``), so the runner's end of study and ``analysis/`` judge a study with the same numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis import naming

CONFIDENCE = 0.95
METHOD = "Welch t over seeds, 95%"
TREND_METHOD = "least-squares slope over trials, t interval (n-2 df), 95%"
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
    # scipy.stats is imported here, not above: it costs 1.2 s, and every trial's worker imports this package
    from scipy.stats import t

    return float(t.ppf(q, df))


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
    columns = variant_columns(trials)
    if not columns:
        return pd.Series("base config", index=trials.index)
    return trials[columns].apply(
        lambda row: ", ".join(f"{c.removeprefix('config/')}={_cell(row[c])}" for c in columns), axis=1)


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


def per_variant(trials: pd.DataFrame, metric: str) -> dict[str, VariantStats]:
    """Each variant's final ``metric`` over its OK trials, in first-seen order (variants without any left out)."""
    ok = trials["status"].eq("OK") if "status" in trials else pd.Series(True, index=trials.index)
    keys = variant_keys(trials)
    values = pd.to_numeric(trials[metric], errors="coerce") if metric in trials else pd.Series(math.nan, trials.index)
    result = {}
    for key in dict.fromkeys(keys):
        chosen = values[ok & keys.eq(key)].dropna()
        if len(chosen):
            result[key] = VariantStats(key, chosen.to_numpy(dtype=float))
    return result


def best_key(groups: dict[str, VariantStats], mode: str) -> str:
    """The variant with the best mean (``mode`` max or min); ties keep the first."""
    sign = 1 if mode == "max" else -1
    return max(groups, key=lambda key: sign * groups[key].mean)
