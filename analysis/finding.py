"""The report's finding for a study, as data, and its verdict on a trials table.

A study script declares ``FINDING`` beside ``BASE`` and ``SPACE``. The judgement lives in the analysis, which
both the runner (end of study, ``finding.json``) and the report's Finding section use; imports flow
studies -> analysis -> trainables, so no trial process imports it (nor pandas and scipy with it).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from trainables.config import ConfigError
from analysis.stats import METHOD, TREND_METHOD, per_variant, slope_interval, variant_keys, welch_interval

SUPPORTED, CONTRADICTED, NOT_SIGNIFICANT, UNTESTABLE = (
    "supported", "contradicted", "not significant at this n", "not testable here")


@dataclass(frozen=True)
class Finding:
    """What the report found: a variant best (or worst) on a metric, or a metric that falls/rises with a param.

    Settings use trials.csv's names without ``config/`` ("optim/lr"); ``among`` restricts the comparison to
    trials with those values, where the study varies them (vae_losses compares losses within MNIST).
    """

    claim: str  # the report's words
    section: str  # where the report says it ("V-B, table I")
    metric: str
    mode: str = "max"  # which direction of ``metric`` is better
    best: dict | None = None
    worst: dict | None = None
    trend: str | None = None  # a numeric param, e.g. "latent_dim"
    direction: str = "falls"  # how ``metric`` moves as ``trend`` grows
    among: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        kinds = [name for name in ("best", "worst", "trend") if getattr(self, name) is not None]
        if len(kinds) != 1:
            raise ConfigError(f"Finding: give exactly one of best=, worst= or trend=; got {kinds or 'none'}")
        if self.mode not in ("max", "min"):
            raise ConfigError(f"Finding.mode: got {self.mode!r}; valid values are 'max', 'min'")
        if self.direction not in ("falls", "rises"):
            raise ConfigError(f"Finding.direction: got {self.direction!r}; valid values are 'falls', 'rises'")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Finding":
        return cls(**values)


@dataclass(frozen=True)
class Verdict:
    """The finding judged on one study: the verdict, what was measured, how, and at which n."""

    finding: Finding
    verdict: str
    measured: str
    method: str
    n: int  # the fewest seeds of a compared variant
    compared: dict = field(default_factory=dict)  # variant (its settings as text) -> its trials ("trial" column)

    def to_dict(self) -> dict:
        return {"claim": self.finding.claim, "section": self.finding.section, "metric": self.finding.metric,
                "verdict": self.verdict, "measured": self.measured, "method": self.method, "n": self.n,
                "finding": self.finding.to_dict(), "compared": self.compared}

    def text(self) -> str:
        return (f"Finding (report {self.finding.section}): {self.finding.claim}\n"
                f"measured: {self.measured}\nverdict: {self.verdict} (n={self.n}; {self.method})")


def _same(value, wanted) -> bool:
    if isinstance(wanted, bool) or not isinstance(wanted, (int, float)):
        return str(value) == str(wanted)
    try:
        return math.isclose(float(value), float(wanted), rel_tol=1e-6)
    except (TypeError, ValueError):
        return False


def _matching(trials: pd.DataFrame, settings: dict) -> pd.Series:
    match = pd.Series(True, index=trials.index)
    for name, wanted in settings.items():
        column = f"config/{name}"
        if column not in trials:
            return pd.Series(False, index=trials.index)
        match &= trials[column].map(lambda value: _same(value, wanted))
    return match


def _restrict(trials: pd.DataFrame, among: dict) -> pd.DataFrame:
    varied = {k: v for k, v in among.items() if f"config/{k}" in trials and trials[f"config/{k}"].nunique() > 1}
    return trials[_matching(trials, varied)] if varied else trials


def judge(finding: Finding, trials: pd.DataFrame) -> Verdict:
    """Supported, contradicted or not significant at this n (Welch intervals over seeds), or not testable."""
    trials = _restrict(trials, finding.among)
    if finding.trend is not None:
        return _judge_trend(finding, trials)
    groups = per_variant(trials, finding.metric)
    settings = finding.best if finding.best is not None else finding.worst
    # "worst" is "best" with the metric's direction turned round
    mode = finding.mode if finding.best is not None else ("min" if finding.mode == "max" else "max")
    sign = 1 if mode == "max" else -1
    wanted = "best" if finding.best is not None else "worst"
    claimed = [k for k in dict.fromkeys(variant_keys(trials)[_matching(trials, settings)]) if k in groups]
    shown = ", ".join(f"{k}={v}" for k, v in settings.items())
    if len(groups) < 2 or not claimed:
        return Verdict(finding, UNTESTABLE, f"no OK variant with {shown} to compare on {finding.metric} among "
                       f"{len(groups)} variant(s)", METHOD, 0)
    keys = variant_keys(trials)
    compared = {k: list(trials.loc[keys.eq(k), "trial"]) for k in groups} if "trial" in trials else {}
    claim = max(claimed, key=lambda k: sign * groups[k].mean)
    top = max(groups, key=lambda k: sign * groups[k].mean)
    n = min(g.n for g in groups.values())
    if claim != top:
        gap = welch_interval(groups[top].values, groups[claim].values)
        measured = (f"{wanted} by mean is {top}: {groups[top].text()}, vs the report's {claim}: "
                    f"{groups[claim].text()}")
        if gap is None:
            return Verdict(finding, NOT_SIGNIFICANT, measured + "; n=1: no interval", METHOD, n, compared)
        measured += f"; {wanted} - report's: {gap.text()}"
        beaten = gap.excludes_zero and sign * gap.estimate > 0
        return Verdict(finding, CONTRADICTED if beaten else NOT_SIGNIFICANT, measured, METHOD, n, compared)
    others = [k for k in groups if k != claim]
    gaps = {k: welch_interval(groups[claim].values, groups[k].values) for k in others}
    runner_up = max(others, key=lambda k: sign * groups[k].mean)
    measured = (f"{claim} is {wanted} by mean: {groups[claim].text()}; next {runner_up}: "
                f"{groups[runner_up].text()}")
    if any(gap is None for gap in gaps.values()):
        return Verdict(finding, NOT_SIGNIFICANT, measured + "; n=1: no interval", METHOD, n, compared)
    unseparated = [k for k, gap in gaps.items() if not (gap.excludes_zero and sign * gap.estimate > 0)]
    measured += f"; report's - next: {gaps[runner_up].text()}"
    if unseparated:
        measured += f"; not separated from {len(unseparated)} variant(s)"
        return Verdict(finding, NOT_SIGNIFICANT, measured, METHOD, n, compared)
    return Verdict(finding, SUPPORTED, measured + f"; separated from all {len(others)} others", METHOD, n, compared)


def _judge_trend(finding: Finding, trials: pd.DataFrame) -> Verdict:
    column = f"config/{finding.trend}"
    ok = trials[trials["status"].eq("OK")] if "status" in trials else trials
    if column not in ok or finding.metric not in ok:
        return Verdict(finding, UNTESTABLE, f"the study does not vary {finding.trend} or has no {finding.metric}",
                       TREND_METHOD, 0)
    data = pd.DataFrame({"x": pd.to_numeric(ok[column], errors="coerce"),
                         "y": pd.to_numeric(ok[finding.metric], errors="coerce")}).dropna()
    if data["x"].nunique() < 2:
        return Verdict(finding, UNTESTABLE, f"{finding.trend} takes {data['x'].nunique()} value(s) among OK trials",
                       TREND_METHOD, 0)
    # powers of two and learning rates are swept geometrically: the slope is per doubling
    geometric = (data["x"] > 0).all() and data["x"].max() >= 8 * data["x"].min()
    x = np.log2(data["x"]) if geometric else data["x"]
    per = f"per doubling of {finding.trend}" if geometric else f"per unit of {finding.trend}"
    n = int(data.groupby("x").size().min())
    means = data.groupby("x")["y"].mean()
    lowest, highest = means.idxmin(), means.idxmax()
    measured = (f"mean {finding.metric} lowest at {finding.trend}={lowest:g} ({means[lowest]:.4g}), highest at "
                f"{highest:g} ({means[highest]:.4g})")
    slope = slope_interval(x, data["y"]) if data.groupby("x").size().max() >= 2 else None
    if slope is None:
        return Verdict(finding, NOT_SIGNIFICANT, measured + "; n=1: no interval", TREND_METHOD, n)
    measured += f"; slope {per} {slope.text()}"
    if not slope.excludes_zero:
        return Verdict(finding, NOT_SIGNIFICANT, measured, TREND_METHOD, n)
    falls = slope.estimate < 0
    agrees = falls == (finding.direction == "falls")
    return Verdict(finding, SUPPORTED if agrees else CONTRADICTED, measured, TREND_METHOD, n)
