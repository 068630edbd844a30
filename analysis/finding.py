"""The report's finding for a study, as data, and its verdict on a trials table.

A study script declares ``FINDING`` beside ``BASE`` and ``SPACE``. The judgement lives in the analysis, which
both the runner (end of study, ``finding.json``) and the report's Finding section use; imports flow
studies -> analysis -> trainables, so no trial process imports it (nor pandas and scipy with it).

How a claim that one variant is best (or worst) among k is judged, from Welch t intervals over seeds:

- **supported**: the claimed variant is ahead of *every* other variant, each comparison at 95% (one-sided
  2.5%). Supported needs all k-1 comparisons to succeed at once: an intersection-union test (Berger 1982), whose
  level is that of each comparison, so no multiplicity correction is due and the verdict keeps its power.
- **contradicted**: some variant outside the claim is ahead of the claimed one, with Bonferroni-adjusted
  intervals over the r variants outside the claim (each at 1 - 5%/r, family-wise 95%; one-sided 2.5%). The variant
  that looks best is picked after the fact among r; comparing the claim with it alone at 95%, as before, said
  "contradicted" 4.7-7% of the time with no true differences. Holm's procedure rejects *some* hypothesis exactly
  when Bonferroni's does, and "some variant beats the claim" is all the verdict asks, so Bonferroni it is (its
  intervals are simultaneous, which Holm's are not).
- **a minimum difference** ``min_difference`` (metric units) counts: "ahead" means the whole interval lies beyond
  it, so groups that differ by less are never "different", even with no spread at all (1.0 vs 0.99999 over
  identical repeats is a zero-width interval that excludes 0 but not the margin). Defaults: rates (accuracy,
  precision, recall, mIoU; stored as fractions by ``trainables/metrics.py``) 0.005, half a percentage point: the
  report's claims rest on gaps of points (96.21% vs 92.87%), and a gap under half a point is no reason to prefer one
  training recipe; losses and their parts have no common unit (a VAE's loss is summed over pixels per image, a
  classifier's a mean cross-entropy), so theirs is relative, 1% of the claimed variant's mean (of the mean over the
  trials for a trend), the same order as the rates' (half a point of 90% is 0.6% of it).
- **full budget only**: a trial the scheduler (ASHA) stopped before its epochs is OK in the table but its metrics
  come from an earlier epoch; such trials are left out of the comparison and listed in ``early_stopped``. A variant
  then keeps only the seeds the scheduler let finish, its better ones, so its mean leans optimistic; the verdict's
  text says which trials went.

A trend claim (``trend=``) fits one least-squares line over the trials, the metric against ``log2`` of the swept
value (``scale="log2"``: the slope is per doubling; latent sizes and learning rates are swept geometrically) or the
value itself (``scale="linear"``), with a t interval (n-2 df, 95%); the fitted change across the swept range must
clear the minimum difference.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from trainables.config import ConfigError
from analysis.stats import CONFIDENCE, full_budget, per_variant, slope_interval, variant_keys, welch_interval

SUPPORTED, CONTRADICTED, NOT_SIGNIFICANT, UNTESTABLE = (
    "supported", "contradicted", "not significant at this n", "not testable here")
RATES = ("val/accuracy", "val/precision", "val/recall", "val/miou")  # fractions in [0, 1]
RATE_MIN_DIFFERENCE = 0.005  # half a percentage point
LOSS_MIN_DIFFERENCE = 0.01  # relative: 1% of the reference mean
SCALES = ("log2", "linear")


@dataclass(frozen=True)
class Finding:
    """What the report found: a variant best (or worst) on a metric, or a metric that falls/rises with a param.

    Settings use trials.csv's names without ``config/`` ("optim/lr"); ``among`` restricts the comparison to
    trials with those values, where the study varies them (vae_losses compares losses within MNIST).
    ``min_difference``: the smallest difference that counts, in the metric's units (None: the metric's default).
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
    min_difference: float | None = None
    scale: str = "log2"  # the trend's model: the metric is a line in log2(trend) ("per doubling") or in trend

    def __post_init__(self) -> None:
        kinds = [name for name in ("best", "worst", "trend") if getattr(self, name) is not None]
        if len(kinds) != 1:
            raise ConfigError(f"Finding: give exactly one of best=, worst= or trend=; got {kinds or 'none'}")
        if self.mode not in ("max", "min"):
            raise ConfigError(f"Finding.mode: got {self.mode!r}; valid values are 'max', 'min'")
        if self.direction not in ("falls", "rises"):
            raise ConfigError(f"Finding.direction: got {self.direction!r}; valid values are 'falls', 'rises'")
        if self.scale not in SCALES:
            raise ConfigError(f"Finding.scale: got {self.scale!r}; valid values are 'log2', 'linear'")
        if self.min_difference is not None and not self.min_difference >= 0:
            raise ConfigError(f"Finding.min_difference: got {self.min_difference!r}; give a number >= 0 "
                              "(in the metric's units) or None for the metric's default")

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
    min_difference: float | None = None  # the smallest difference that counted, in the metric's units
    min_difference_rule: str = ""  # where it comes from ("0.5 percentage point, the default for val/accuracy")
    early_stopped: list = field(default_factory=list)  # trials stopped before their epochs, left out
    trend_model: str | None = None  # the fitted line of a trend finding ("val/loss = a + b*log2(latent_dim)")

    def to_dict(self) -> dict:
        return {"claim": self.finding.claim, "section": self.finding.section, "metric": self.finding.metric,
                "verdict": self.verdict, "measured": self.measured, "method": self.method, "n": self.n,
                "finding": self.finding.to_dict(), "compared": self.compared, "min_difference": self.min_difference,
                "min_difference_rule": self.min_difference_rule, "early_stopped": self.early_stopped,
                "trend_model": self.trend_model}

    def notes(self) -> list[str]:
        """The sentences beside the verdict: the minimum difference, the trend model, the trials left out."""
        lines = []
        if self.min_difference is not None:
            lines.append(f"a difference counts only where its whole interval clears the minimum difference "
                         f"{self.min_difference:.4g} in {self.finding.metric} ({self.min_difference_rule})")
        if self.trend_model:
            lines.append(f"trend model: {self.trend_model}, least squares over the trials")
        if self.early_stopped:
            lines.append(f"{len(self.early_stopped)} trial(s) stopped early by the scheduler (fewer epochs than their "
                         f"budget) are left out; the variants they belong to are judged on their other seeds, which "
                         f"the scheduler kept: {', '.join(map(str, self.early_stopped))}")
        return lines

    def text(self) -> str:
        return (f"Finding (report {self.finding.section}): {self.finding.claim}\n"
                f"measured: {self.measured}\nverdict: {self.verdict} (n={self.n}; {self.method})"
                + "".join(f"\n{line}" for line in self.notes()))


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


def _min_difference(finding: Finding, reference: float, of: str) -> tuple[float, str]:
    """The smallest difference that counts, and where it comes from (a relative one: ``reference``, ``of`` what)."""
    if finding.min_difference is not None:
        return float(finding.min_difference), "set by the finding"
    if finding.metric in RATES:
        return RATE_MIN_DIFFERENCE, "half a percentage point, the default for rates"
    value = LOSS_MIN_DIFFERENCE * abs(reference) if math.isfinite(reference) else 0.0
    return value, f"{LOSS_MIN_DIFFERENCE:.0%} of {reference:.4g}, {of}: the default for losses"


def judge(finding: Finding, trials: pd.DataFrame) -> Verdict:
    """Supported, contradicted or not significant at this n (see the module docstring), or not testable."""
    trials, stopped = full_budget(_restrict(trials, finding.among))
    verdict = _judge_trend(finding, trials) if finding.trend is not None else _judge_rank(finding, trials)
    return dataclasses.replace(verdict, early_stopped=stopped)


def _rank_method(rivals: int, margin: float | None) -> str:
    method = "Welch t over seeds; supported: ahead of every other variant, 95% each (intersection-union test)"
    if margin is None:
        return method
    family = f"Bonferroni over {rivals} rival(s), {1 - (1 - CONFIDENCE) / rivals:.2%} each" if rivals else "no rivals"
    return method + f"; contradicted: a rival ahead, {family}; ahead = beyond the minimum difference {margin:.4g}"


def _judge_rank(finding: Finding, trials: pd.DataFrame) -> Verdict:
    keys = variant_keys(trials)
    groups = per_variant(trials, finding.metric, keys)
    settings = finding.best if finding.best is not None else finding.worst
    # "worst" is "best" with the metric's direction turned round
    mode = finding.mode if finding.best is not None else ("min" if finding.mode == "max" else "max")
    sign = 1 if mode == "max" else -1
    wanted = "best" if finding.best is not None else "worst"
    claimed = [k for k in dict.fromkeys(keys[_matching(trials, settings)]) if k in groups]
    shown = ", ".join(f"{k}={v}" for k, v in settings.items())
    if len(groups) < 2 or not claimed:
        return Verdict(finding, UNTESTABLE, f"no full-budget OK variant with {shown} to compare on {finding.metric} "
                       f"among {len(groups)} variant(s)", _rank_method(0, None), 0)
    names = {k: list(v) for k, v in trials["trial"].groupby(keys, sort=False)} if "trial" in trials else {}
    compared = {k: names[k] for k in groups if k in names}
    claim = max(claimed, key=lambda k: sign * groups[k].mean)  # several variants may match the claim's settings
    top = max(groups, key=lambda k: sign * groups[k].mean)
    n = min(g.n for g in groups.values())
    margin, rule = _min_difference(finding, groups[claim].mean, "the report's variant's mean")
    others = [k for k in groups if k != claim]
    rivals = [k for k in others if k not in claimed]  # a sibling of the claim ahead of it contradicts nothing
    family = 1 - (1 - CONFIDENCE) / max(len(rivals), 1)
    ahead = {k: welch_interval(groups[claim].values, groups[k].values) for k in others}
    behind = {k: welch_interval(groups[k].values, groups[claim].values, family) for k in rivals}
    method = _rank_method(len(rivals), margin)

    def verdict(result: str, measured: str) -> Verdict:
        return Verdict(finding, result, measured, method, n, compared, margin, rule)

    if groups[claim].n < 2:
        return verdict(NOT_SIGNIFICANT, f"report's {claim}: {groups[claim].text()}; n=1: no interval")
    beaten = sorted((k for k, gap in behind.items() if gap is not None and gap.beyond(margin, sign)),
                    key=lambda k: -sign * groups[k].mean)
    missing = [k for k in others if ahead[k] is None]
    lonely = f"; n=1: no interval for {len(missing)} variant(s)" if missing else ""
    if claim != top:
        measured = (f"{wanted} by mean is {top}: {groups[top].text()}, vs the report's {claim}: "
                    f"{groups[claim].text()}")
        if beaten:
            gap = behind[beaten[0]]
            who = wanted if beaten[0] == top else f"{beaten[0]} ({groups[beaten[0]].text()})"
            return verdict(CONTRADICTED, measured + f"; {who} - report's: {gap.text()} ({family:.2%}, Bonferroni "
                           f"over {len(rivals)}), beyond the minimum difference {margin:.4g}")
        gap = behind.get(top)
        measured += f"; {wanted} - report's: {gap.text()} ({family:.2%}, Bonferroni over {len(rivals)})" if gap else ""
        return verdict(NOT_SIGNIFICANT, measured + lonely + f"; no rival's interval lies beyond the minimum "
                       f"difference {margin:.4g}")
    runner_up = max(others, key=lambda k: sign * groups[k].mean)
    measured = f"{claim} is {wanted} by mean: {groups[claim].text()}; next {runner_up}: {groups[runner_up].text()}"
    if ahead[runner_up] is not None:
        measured += f"; report's - next: {ahead[runner_up].text()}"
    unseparated = [k for k, gap in ahead.items() if gap is None or not gap.beyond(margin, sign)]
    if unseparated:
        return verdict(NOT_SIGNIFICANT, measured + lonely + f"; not separated from {len(unseparated)} variant(s) by "
                       f"more than the minimum difference {margin:.4g}")
    return verdict(SUPPORTED, measured + f"; separated from all {len(others)} others by more than {margin:.4g}")


def _judge_trend(finding: Finding, trials: pd.DataFrame) -> Verdict:
    column, log2 = f"config/{finding.trend}", finding.scale == "log2"
    x_name = f"log2({finding.trend})" if log2 else finding.trend
    model = f"{finding.metric} = a + b*{x_name}"
    per = f"per doubling of {finding.trend}" if log2 else f"per unit of {finding.trend}"
    method = f"least-squares line {model} ({per}) over trials, t interval (n-2 df), 95%"
    ok = trials[trials["status"].eq("OK")] if "status" in trials else trials

    def verdict(result: str, measured: str, n: int, margin: float | None = None, rule: str = "") -> Verdict:
        return Verdict(finding, result, measured, method, n, {}, margin, rule, trend_model=model)

    if column not in ok or finding.metric not in ok:
        return verdict(UNTESTABLE, f"the study does not vary {finding.trend} or has no {finding.metric}", 0)
    data = pd.DataFrame({"x": pd.to_numeric(ok[column], errors="coerce"),
                         "y": pd.to_numeric(ok[finding.metric], errors="coerce")}).dropna()
    if data["x"].nunique() < 2:
        return verdict(UNTESTABLE, f"{finding.trend} takes {data['x'].nunique()} value(s) among full-budget OK trials",
                       0)
    if log2 and not (data["x"] > 0).all():
        return verdict(UNTESTABLE, f"{finding.trend} takes values <= 0, which have no log2: declare the finding "
                       "with scale='linear'", 0)
    x = np.log2(data["x"]) if log2 else data["x"]
    span = float(x.max() - x.min())
    n = int(data.groupby("x").size().min())
    means = data.groupby("x")["y"].mean()
    lowest, highest = means.idxmin(), means.idxmax()
    measured = (f"mean {finding.metric} lowest at {finding.trend}={lowest:g} ({means[lowest]:.4g}), highest at "
                f"{highest:g} ({means[highest]:.4g})")
    margin, rule = _min_difference(finding, float(data["y"].mean()), "the mean over the trials")
    slope = slope_interval(x, data["y"]) if data.groupby("x").size().max() >= 2 else None
    if slope is None:
        return verdict(NOT_SIGNIFICANT, measured + "; n=1: no interval", n, margin, rule)
    # the fitted change from the smallest to the largest value swept must clear the minimum difference
    change = slope.scaled(span)
    over = f"{span:g} doublings" if log2 else f"{data['x'].min():g} to {data['x'].max():g}"
    measured += f"; slope {per} {slope.text()}; fitted change over the sweep ({over}) {change.text()}"
    claimed = -1 if finding.direction == "falls" else 1
    if change.beyond(margin, claimed):
        return verdict(SUPPORTED, measured, n, margin, rule)
    if change.beyond(margin, -claimed):
        return verdict(CONTRADICTED, measured, n, margin, rule)
    return verdict(NOT_SIGNIFICANT, measured + f"; not beyond the minimum difference {margin:.4g}", n, margin, rule)
