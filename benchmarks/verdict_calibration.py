"""How often does a finding's verdict say the wrong thing, and how often the right one? Simulated studies, judged
by the real verdict code.

Each simulated study is a trials table shaped like the runner's trials.csv (trial, status, config/optim/lr,
config/seed, config/epochs, val/accuracy, epoch): k variants x s seeds, each seed's accuracy drawn from a normal
around 90% with a seed-to-seed sd of 1 percentage point; the finding claims that variant A (the first lr) is best.
``analysis.finding.judge`` judges every study twice: with the default minimum difference (half a percentage point
for accuracy) and with none (min_difference=0: the bare test, the worst case for any noise larger than ours).

    null    all k variants equal: "contradicted" is false (A is as good as any), so is "supported" (A is no better)
    tie     A tied with one rival at the top, the others 10 sd below: the least favourable case for "supported"
            (with k = 2 it is the null)
    spread  the null with unequal spreads: A's sd 1 point, the rivals' 3 (Welch's t is approximate there; with
            3 seeds it errs on the liberal side)
    ahead   A better than every other variant by EFFECT: "supported" is the power, "contradicted" is false
    behind  one rival better than A by EFFECT: "contradicted" is the power, "supported" is false

The false-verdict rate is the worst of those per cell; nominal is 2.5%, one side of a 95% interval. The column
"before" is the rule this replaced (the claim against the best by mean, Welch 95%, no correction), on the same
null studies, from the same per-variant numbers.

    python benchmarks/verdict_calibration.py            # 4000 studies per false-verdict cell, 1000 per power cell
    python benchmarks/verdict_calibration.py --smoke    # 10 studies per cell (about 500), seconds; *_smoke.json
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import pandas as pd

from common import table, write_json

from analysis.finding import CONTRADICTED, RATE_MIN_DIFFERENCE, SUPPORTED, Finding, judge
from analysis.stats import per_variant, welch_interval

SEEDS, VARIANTS = (3, 5), (2, 3, 4, 5, 6)
MEAN, SD, EFFECT = 0.90, 0.01, 0.03  # accuracy as a fraction; EFFECT = 3 sd = 3 percentage points
EPOCHS, NOMINAL = 3, 0.025
LRS = (0.1, 0.05, 0.02, 0.01, 0.005, 0.002)
CLAIM = Finding("A is best", "sim", metric="val/accuracy", mode="max", best={"optim/lr": LRS[0]})
CLAIM_MARGIN = RATE_MIN_DIFFERENCE
BARE = Finding("A is best", "sim", metric="val/accuracy", mode="max", best={"optim/lr": LRS[0]}, min_difference=0.0)
# which verdict is false in which scenario
FALSE = {"null": (CONTRADICTED, SUPPORTED), "tie": (CONTRADICTED, SUPPORTED), "spread": (CONTRADICTED, SUPPORTED),
         "ahead": (CONTRADICTED,), "behind": (SUPPORTED,)}
SCENARIOS = tuple(FALSE)


def truth(scenario: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The true mean and sd of each variant, A first."""
    mean, sd = np.full(k, MEAN), np.full(k, SD)
    if scenario == "tie":
        mean[2:] -= 10 * SD
    elif scenario == "spread":
        sd[1:] *= 3
    elif scenario == "ahead":
        mean[1:] -= EFFECT
    elif scenario == "behind":
        mean[1] += EFFECT
    return mean, sd


def study(mean: np.ndarray, sd: np.ndarray, seeds: int, rng: np.random.Generator) -> pd.DataFrame:
    """One study's trials table, as the runner writes it (every trial ran its full budget)."""
    values = rng.normal(mean[:, None], sd[:, None], size=(len(mean), seeds))
    k = len(mean)
    return pd.DataFrame({
        "trial": [f"train_classifier_sim00_{i:05d}" for i in range(k * seeds)], "status": "OK",
        "config/optim/lr": np.repeat(LRS[:k], seeds), "config/seed": np.tile(np.arange(seeds), k),
        "config/epochs": EPOCHS, "val/accuracy": values.ravel(), "epoch": EPOCHS})


def before(trials: pd.DataFrame) -> bool:
    """The replaced rule's "contradicted": the best by mean beats the claim's variant, Welch 95%, unadjusted."""
    groups = per_variant(trials, "val/accuracy")
    claim, top = f"optim/lr={LRS[0]:.6g}", max(groups, key=lambda key: groups[key].mean)
    gap = welch_interval(groups[top].values, groups[claim].values) if top != claim else None
    return gap is not None and gap.low > 0


def cell(scenario: str, seeds: int, k: int, count: int, rng: np.random.Generator) -> dict:
    """Rates of each verdict over ``count`` simulated studies, with and without the minimum difference."""
    counts = {"supported": 0, "contradicted": 0, "supported_bare": 0, "contradicted_bare": 0, "before": 0}
    for _ in range(count):
        trials = study(*truth(scenario, k), seeds, rng)
        for suffix, finding in (("", CLAIM), ("_bare", BARE)):
            verdict = judge(finding, trials).verdict
            counts[f"supported{suffix}"] += verdict == SUPPORTED
            counts[f"contradicted{suffix}"] += verdict == CONTRADICTED
        counts["before"] += scenario == "null" and before(trials)
    rates = {name: value / count for name, value in counts.items()}
    false = [rates[f"{verdict.split()[0]}{suffix}"] for verdict in FALSE[scenario] for suffix in ("", "_bare")]
    return {"scenario": scenario, "seeds": seeds, "variants": k, "studies": count, **rates, "false": max(false)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="10 studies per cell: checks the code path in seconds")
    parser.add_argument("--studies", type=int, default=4000,
                        help="studies per false-verdict cell (null, tie, spread); the power cells get a quarter")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    count = 10 if args.smoke else args.studies
    power_count = count if args.smoke else max(count // 4, 1)
    rng = np.random.default_rng(args.seed)
    start, cells = time.perf_counter(), []
    for seeds in SEEDS:
        for k in VARIANTS:
            for scenario in SCENARIOS:
                if scenario == "tie" and k == 2:
                    continue  # A tied with its only rival: the null
                cells.append(cell(scenario, seeds, k, power_count if scenario in ("ahead", "behind") else count, rng))
    rows = []
    for seeds in SEEDS:
        for k in VARIANTS:
            found = {c["scenario"]: c for c in cells if c["seeds"] == seeds and c["variants"] == k}
            null, tie, spread = found["null"], found.get("tie", found["null"]), found["spread"]
            ahead, behind = found["ahead"], found["behind"]
            rows.append({"seeds": seeds, "variants": k, "C|null": null["contradicted"],
                         "C|null bare": null["contradicted_bare"], "C|null before": null["before"],
                         "S|tie": tie["supported"], "S|tie bare": tie["supported_bare"],
                         "C|spread bare": spread["contradicted_bare"], "S|spread bare": spread["supported_bare"],
                         "S|ahead": ahead["supported"], "S|ahead bare": ahead["supported_bare"],
                         "C|behind": behind["contradicted"], "C|behind bare": behind["contradicted_bare"],
                         "false": max(c["false"] for c in found.values())})
    worst = max(cells, key=lambda c: c["false"])
    parts = {"default minimum difference": ("", SCENARIOS),
             "bare, equal spreads": ("_bare", ("null", "tie", "ahead", "behind")),
             "bare, unequal spreads": ("_bare", ("spread",))}
    worst_of = {name: max(c[f"{verdict.split()[0]}{suffix}"] for c in cells if c["scenario"] in scenarios
                          for verdict in FALSE[c["scenario"]]) for name, (suffix, scenarios) in parts.items()}
    se = math.sqrt(NOMINAL * (1 - NOMINAL) / worst["studies"])
    seconds = time.perf_counter() - start
    print(f"\n=== verdict calibration: {count} simulated studies per false-verdict cell, {power_count} per power "
          f"cell; seed sd {SD:g}, effect {EFFECT:g} ({EFFECT / SD:g} sd); default minimum difference "
          f"{CLAIM_MARGIN:g}, bare = min_difference 0" + (" (SMOKE: not a measurement)" if args.smoke else "") + " ===")
    print(table(rows))
    print(f"\nC = contradicted, S = supported, their rates in the scenario after '|': false verdicts in null, tie "
          f"and spread; S|ahead is the power at the effect, C|behind contradicted's. false = the worst false verdict "
          f"of the cell's five scenarios, with or without the minimum difference. before = the replaced rule, "
          f"null. {seconds:.0f} s")
    path = write_json("verdict_calibration", {
        "studies": count, "power_studies": power_count, "sd": SD, "effect": EFFECT, "mean": MEAN,
        "min_difference": CLAIM_MARGIN, "nominal": NOMINAL, "seed": args.seed, "cells": cells, "rows": rows,
        "worst": worst, "worst_of": worst_of, "monte_carlo_se_at_nominal": se, "seconds": seconds}, smoke=args.smoke)
    print(f"json: {path}")
    print("worst false-verdict rate by part: " + "; ".join(f"{name} {rate:.3f}" for name, rate in worst_of.items()))
    print(f"worst false-verdict rate: {worst['false']:.3f} (nominal {NOMINAL}; {worst['scenario']} at "
          f"{worst['seeds']} seeds, {worst['variants']} variants; Monte Carlo s.e. {se:.3f})")


if __name__ == "__main__":
    main()
