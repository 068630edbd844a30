"""Seeds per sample, error bars over seeds, the report's finding judged, pretrained encoders resolved before Ray.

Intervals are checked against scipy and a hand computation on fixed numbers; verdicts and the report's Finding
section on hand-built studies in Tune's on-disk layout; pretrained weights offline from a state dict the test
writes into a temporary TORCH_HOME.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from analysis import figures
from analysis.html import write_html, write_markdown
from analysis.load import load_study
from analysis.report import build_report
from analysis.variants import variant_table
from conftest import ROOT, study_command
from studies.runner.space import merge_space, sample_seed, seed_samples
from analysis.finding import Finding
from trainables import ClassifyConfig, SegmentConfig
from analysis.finding import CONTRADICTED, NOT_SIGNIFICANT, SUPPORTED, UNTESTABLE, judge
from analysis.stats import slope_interval, welch_interval


# ----------------------------------------------------------------------------- intervals
def test_welch_interval_against_scipy_and_by_hand():
    a, b = [1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]
    # by hand: diff -3.5, se^2 = 1/3 + (5/3)/4 = 0.75, Welch df = 0.75^2 / ((1/3)^2/2 + (5/12)^2/3) = 4.9592
    df = 0.75 ** 2 / ((1 / 3) ** 2 / 2 + (5 / 12) ** 2 / 3)
    assert df == pytest.approx(4.9592, abs=1e-4)
    half = stats.t.ppf(0.975, df) * math.sqrt(0.75)
    interval = welch_interval(a, b)
    assert interval.estimate == pytest.approx(-3.5)
    assert (interval.low, interval.high) == pytest.approx((-3.5 - half, -3.5 + half))
    assert (interval.low, interval.high) == pytest.approx((-5.7315, -1.2685), abs=1e-3)  # t(0.975, 4.96) = 2.5766
    assert interval.excludes_zero
    rng = np.random.default_rng(3)
    for n_a, n_b in ((2, 2), (3, 5), (8, 4)):
        x, y = rng.normal(0.9, 0.02, n_a), rng.normal(0.91, 0.05, n_b)
        want = stats.ttest_ind(x, y, equal_var=False).confidence_interval(0.95)
        got = welch_interval(x, y)
        assert (got.low, got.high) == pytest.approx((want.low, want.high))
    assert welch_interval([0.9], [0.8, 0.7]) is None  # n=1: no interval
    exact = welch_interval([0.5, 0.5], [0.4, 0.4])  # identical repeats: no spread, an exact difference
    assert (exact.low, exact.high) == pytest.approx((0.1, 0.1)) and exact.excludes_zero


def test_slope_interval_by_hand():
    x, y = np.array([0.0, 1.0, 2.0, 3.0, 4.0]), np.array([1.0, 0.8, 0.7, 0.3, 0.2])
    sxx = ((x - x.mean()) ** 2).sum()
    slope = ((x - x.mean()) * (y - y.mean())).sum() / sxx
    residuals = y - (y.mean() + slope * (x - x.mean()))
    se = math.sqrt((residuals ** 2).sum() / 3 / sxx)
    got = slope_interval(x, y)
    assert got.estimate == pytest.approx(slope) == pytest.approx(-0.21)
    assert got.high - got.estimate == pytest.approx(stats.t.ppf(0.975, 3) * se)
    assert got.high < 0
    assert slope_interval([1, 2], [3, 4]) is None and slope_interval([2, 2, 2], [1, 2, 3]) is None


# ----------------------------------------------------------------------------- verdicts
def _trials(results: dict[tuple, list[float]], columns: tuple[str, ...], metric: str = "val/accuracy") -> pd.DataFrame:
    """A trials table as the runner writes it: one row per (variant, seed)."""
    rows = []
    for setting, values in results.items():
        for index, value in enumerate(values):
            rows.append({"trial": f"t_{len(rows):05d}", "status": "OK", "config/seed": sample_seed(0, index),
                         **{f"config/{c}": v for c, v in zip(columns, setting)}, metric: value, "epoch": 3})
    return pd.DataFrame(rows)


ARCH = Finding("ResNet at lr 0.05 is best", "II", metric="val/accuracy", mode="max",
               best={"model": "resnet18", "optim/lr": 0.05})
COLUMNS = ("model", "optim/lr")


def test_a_clear_winner_is_supported_and_overlapping_seeds_are_not_significant():
    clear = _trials({("resnet18", 0.05): [0.95, 0.96, 0.955], ("resnet18", 0.1): [0.90, 0.91, 0.905],
                     ("vgg16", 0.05): [0.80, 0.82, 0.81], ("vgg16", 0.1): [0.70, 0.72, 0.71]}, COLUMNS)
    verdict = judge(ARCH, clear)
    assert verdict.verdict == SUPPORTED and verdict.n == 3 and "Welch" in verdict.method
    assert "model=resnet18, optim/lr=0.05 is best by mean" in verdict.measured
    overlap = _trials({("resnet18", 0.05): [0.95, 0.90, 0.99], ("resnet18", 0.1): [0.94, 0.96, 0.91],
                       ("vgg16", 0.05): [0.80, 0.82, 0.81], ("vgg16", 0.1): [0.70, 0.72, 0.71]}, COLUMNS)
    verdict = judge(ARCH, overlap)
    assert verdict.verdict == NOT_SIGNIFICANT and "not separated from 1 variant" in verdict.measured
    beaten = _trials({("resnet18", 0.05): [0.80, 0.81, 0.79], ("resnet18", 0.1): [0.95, 0.96, 0.955],
                      ("vgg16", 0.05): [0.60, 0.62], ("vgg16", 0.1): [0.50, 0.52]}, COLUMNS)
    verdict = judge(ARCH, beaten)
    assert verdict.verdict == CONTRADICTED and "optim/lr=0.1" in verdict.measured and verdict.n == 2
    single = _trials({("resnet18", 0.05): [0.99], ("resnet18", 0.1): [0.2], ("vgg16", 0.05): [0.9],
                      ("vgg16", 0.1): [0.9]}, COLUMNS)
    verdict = judge(ARCH, single)
    assert verdict.verdict == NOT_SIGNIFICANT and "n=1: no interval" in verdict.measured
    missing = _trials({("vgg16", 0.05): [0.9, 0.91], ("vgg16", 0.1): [0.8, 0.82]}, COLUMNS)
    assert judge(ARCH, missing).verdict == UNTESTABLE


def test_worst_trend_and_among_findings():
    weights = Finding("no weights: background only", "V-C", metric="val/recall", mode="max",
                      worst={"class_weights": "none"})
    table = _trials({("none",): [0.05, 0.06, 0.05], ("0.1",): [0.4, 0.45, 0.42], ("0.01",): [0.3, 0.35, 0.33]},
                    ("class_weights",), "val/recall")
    assert judge(weights, table).verdict == SUPPORTED
    latent = Finding("bigger latents, lower loss", "III", metric="val/loss", trend="latent_dim", direction="falls")
    falling = _trials({(2,): [150, 152], (8,): [120, 121], (32,): [100, 103]}, ("latent_dim",), "val/loss")
    verdict = judge(latent, falling)
    assert verdict.verdict == SUPPORTED and "per doubling of latent_dim" in verdict.measured
    rising = _trials({(2,): [100, 101], (8,): [110, 112], (32,): [125, 127]}, ("latent_dim",), "val/loss")
    assert judge(latent, rising).verdict == CONTRADICTED
    flat = _trials({(2,): [100, 120], (8,): [115, 105], (32,): [108, 111]}, ("latent_dim",), "val/loss")
    assert judge(latent, flat).verdict == NOT_SIGNIFICANT
    assert "n=1" in judge(latent, _trials({(2,): [150], (8,): [120], (32,): [100]}, ("latent_dim",),
                                          "val/loss")).measured
    # among: the CIFAR-10 variants (larger losses) are left out of an MNIST claim, where the data set varies
    losses = Finding("bce+mse smallest", "III", metric="val/loss", mode="min", best={"loss": "bce+mse"},
                     among={"dataset": "mnist"})
    table = _trials({("bce", "mnist"): [110, 111], ("bce+mse", "mnist"): [100, 101], ("bce", "cifar10"): [50, 51],
                     ("bce+mse", "cifar10"): [60, 61]}, ("loss", "dataset"), "val/loss")
    assert judge(losses, table).verdict == SUPPORTED
    with pytest.raises(ValueError, match="exactly one of best=, worst= or trend="):
        Finding("x", "II", metric="val/loss")


def test_groups_within_the_minimum_difference_are_not_different_even_without_spread():
    claim = Finding("A is best", "II", metric="val/accuracy", best={"model": "a"})
    # identical repeats: zero-width intervals, which exclude 0 for any difference (the verdict said "supported")
    tiny = _trials({("a",): [1.0, 1.0, 1.0], ("b",): [0.99999] * 3}, ("model",))
    verdict = judge(claim, tiny)
    assert verdict.verdict == NOT_SIGNIFICANT and verdict.min_difference == 0.005
    assert "minimum difference 0.005" in verdict.measured
    assert "half a percentage point, the default for rates" in verdict.text()
    assert judge(claim, _trials({("a",): [1.0] * 3, ("b",): [0.99] * 3}, ("model",))).verdict == SUPPORTED
    exact = dataclasses.replace(claim, min_difference=0.0)  # the bare test, as before: any exact difference counts
    assert judge(exact, tiny).verdict == SUPPORTED
    # seen from the other side: the report's variant behind by less than the minimum is not contradicted
    other = Finding("b is best", "II", metric="val/accuracy", best={"model": "b"})
    assert judge(other, tiny).verdict == NOT_SIGNIFICANT
    # losses: 1% of the claimed variant's mean
    loss = Finding("a has the lowest loss", "III", metric="val/loss", mode="min", best={"model": "a"})
    close = judge(loss, _trials({("a",): [100.0] * 3, ("b",): [100.5] * 3}, ("model",), "val/loss"))
    assert close.verdict == NOT_SIGNIFICANT and close.min_difference == pytest.approx(1.0)
    assert "1% of 100" in close.min_difference_rule and close.to_dict()["min_difference"] == pytest.approx(1.0)
    assert judge(loss, _trials({("a",): [100.0] * 3, ("b",): [102.0] * 3}, ("model",), "val/loss")).verdict == SUPPORTED
    with pytest.raises(ValueError, match="min_difference"):
        Finding("x", "II", metric="val/loss", best={"model": "a"}, min_difference=-1)


def test_contradicted_is_corrected_for_the_rivals_and_supported_is_not():
    claim = Finding("A is best", "II", metric="val/accuracy", best={"model": "a"})
    behind, ahead = [0.90, 0.91, 0.92], [0.93, 0.94, 0.95]  # 3 points apart; Welch 95%: [+0.0073, +0.0527]
    far = {(name,): [0.50, 0.51, 0.52] for name in "cdef"}
    two = judge(claim, _trials({("a",): behind, ("b",): ahead}, ("model",)))
    assert two.verdict == CONTRADICTED and "Bonferroni over 1 rival(s)" in two.method
    # the same two groups among six variants: the best rival is picked among 5, each interval at 99% (t(4) 4.60
    # instead of 2.78), whose lower end +0.03 - 4.604 * 0.00816 = -0.0076 no longer clears the minimum difference
    six = judge(claim, _trials({("a",): behind, ("b",): ahead, **far}, ("model",)))
    assert six.verdict == NOT_SIGNIFICANT and "Bonferroni over 5 rival(s), 99.00% each" in six.method
    assert "model=b" in six.measured and "99.00%" in six.measured
    # supported needs every comparison at once (intersection-union): no correction, the same lead suffices among six
    lead = judge(claim, _trials({("a",): ahead, ("b",): behind, **far}, ("model",)))
    assert lead.verdict == SUPPORTED and "separated from all 5 others" in lead.measured
    # another variant matching the claim's settings is the claim's, not a rival: one rival, no correction (over 2,
    # at 98.75%, the lower end would be +0.0015)
    table = _trials({("a", 1): behind, ("a", 2): [0.50, 0.51, 0.52], ("b", 1): ahead}, ("model", "width"))
    siblings = judge(claim, table)
    assert siblings.verdict == CONTRADICTED and "Bonferroni over 1 rival(s)" in siblings.method


def test_trials_stopped_early_are_listed_apart_and_not_judged():
    table = _trials({("a",): [0.95, 0.96, 0.955], ("b",): [0.90, 0.91, 0.905, 0.30]}, ("model",))
    table["config/epochs"] = 3
    stopped = table.index[-1]  # ASHA stopped it after one epoch: its accuracy is the first epoch's
    table.loc[stopped, "epoch"] = 1
    table = pd.concat([table, table.iloc[[0]].assign(trial="t_cut", status="INTERRUPTED", epoch=2)], ignore_index=True)
    claim = Finding("A is best", "II", metric="val/accuracy", best={"model": "a"})
    verdict = judge(claim, table)
    assert verdict.verdict == SUPPORTED and verdict.n == 3  # with the stopped trial, B's spread hid the lead
    assert verdict.early_stopped == [table.loc[stopped, "trial"]]  # the interrupted trial is not ASHA's
    assert table.loc[stopped, "trial"] not in sum(verdict.compared.values(), [])
    assert verdict.to_dict()["early_stopped"] == verdict.early_stopped
    assert "1 trial(s) stopped early by the scheduler" in verdict.text() and "t_00006" in verdict.text()
    assert judge(claim, table.drop(columns="config/epochs")).verdict == NOT_SIGNIFICANT  # no budget: all judged


def test_the_trend_model_is_named_and_an_exact_tiny_slope_is_no_trend():
    latent = Finding("bigger latents, lower loss", "III", metric="val/loss", trend="latent_dim", direction="falls")
    falling = _trials({(2,): [150, 152], (8,): [120, 121], (32,): [100, 103]}, ("latent_dim",), "val/loss")
    verdict = judge(latent, falling)
    assert verdict.trend_model == "val/loss = a + b*log2(latent_dim)" and "per doubling" in verdict.method
    assert "trend model: val/loss = a + b*log2(latent_dim)" in verdict.text()
    assert "4 doublings" in verdict.measured and verdict.to_dict()["trend_model"] == verdict.trend_model
    linear = judge(dataclasses.replace(latent, scale="linear"), falling)
    assert linear.trend_model == "val/loss = a + b*latent_dim" and "per unit of latent_dim" in linear.measured
    # an exact line (identical repeats) falling by 0.002 over the sweep: zero-width, but far below 1% of the loss
    exact = _trials({(2,): [100.0, 100.0], (4,): [99.999, 99.999], (8,): [99.998, 99.998]}, ("latent_dim",),
                    "val/loss")
    assert judge(latent, exact).verdict == NOT_SIGNIFICANT
    assert judge(dataclasses.replace(latent, min_difference=0.0), exact).verdict == SUPPORTED
    with pytest.raises(ValueError, match="Finding.scale"):
        Finding("x", "III", metric="val/loss", trend="latent_dim", scale="log10")


def test_verdict_calibration_smoke_covers_every_cell(tmp_path):
    env = {**os.environ, "VISION_TUNE_BENCH_OUT": str(tmp_path)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "verdict_calibration.py"), "--smoke"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"worst false-verdict rate: ([0-9.]+) \(nominal 0\.025; .*\)", last)
    assert match, last
    result = json.loads((tmp_path / "verdict_calibration_smoke.json").read_text())
    assert result["smoke"] is True and float(match.group(1)) == pytest.approx(result["worst"]["false"], abs=5e-4)
    cells = {(row["seeds"], row["variants"]) for row in result["rows"]}
    assert cells == {(seeds, k) for seeds in (3, 5) for k in range(2, 7)}
    scenarios = {(c["seeds"], c["variants"], c["scenario"]) for c in result["cells"]}
    assert all((seeds, k, s) in scenarios for seeds, k in cells for s in ("null", "spread", "ahead", "behind"))
    assert all(0 <= c[rate] <= 1 for c in result["cells"] for rate in ("supported", "contradicted", "false"))


# ----------------------------------------------------------------------------- the report's Finding section
def _write_study(folder: Path, results: dict[tuple, list[float]], finding: Finding) -> Path:
    """A classification study in Tune's layout: study.json (with the finding), trials.csv, trial folders."""
    table = _trials(results, COLUMNS)
    folder.mkdir(parents=True)
    for _, row in table.iterrows():
        trial = folder / f"train_classifier_abcde_{row['trial'][2:]}"
        trial.mkdir()
        config = {"model": row["config/model"], "optim": {"lr": row["config/optim/lr"]}, "seed": row["config/seed"],
                  "dataset": "digits"}
        (trial / "params.json").write_text(json.dumps(config))
        (trial / "result.json").write_text("".join(json.dumps(
            {"epoch": e, "train/loss": 2.0 / e, "val/loss": 2.1 / e, "val/accuracy": row["val/accuracy"] * e / 3,
             "val/precision": row["val/accuracy"]}) + "\n" for e in (1, 2, 3)))
    table["trial"] = [f"train_classifier_abcde_{t[2:]}" for t in table["trial"]]
    table["val/precision"] = table["val/accuracy"]
    table.to_csv(folder / "trials.csv", index=False)
    (folder / "study.json").write_text(json.dumps(
        {"name": folder.name, "task": "classification", "metric": "val/accuracy", "mode": "max", "mlflow_uri": None,
         "base": {}, "argv": [], "finding": finding.to_dict()}))
    return folder


@pytest.mark.parametrize("case, results, verdict", [
    ("clear", {("resnet18", 0.05): [0.95, 0.96, 0.955], ("resnet18", 0.1): [0.90, 0.91, 0.905],
               ("vgg16", 0.05): [0.80, 0.82, 0.81], ("vgg16", 0.1): [0.70, 0.72, 0.71]}, SUPPORTED),
    ("overlap", {("resnet18", 0.05): [0.95, 0.90, 0.99], ("resnet18", 0.1): [0.94, 0.96, 0.91],
                 ("vgg16", 0.05): [0.80, 0.82, 0.81], ("vgg16", 0.1): [0.70, 0.72, 0.71]}, NOT_SIGNIFICANT),
])
def test_report_opens_with_the_finding_and_gives_error_bars(case, results, verdict, tmp_path):
    study = load_study(_write_study(tmp_path / f"cls_{case}", results, ARCH))
    report = build_report(study, perplexity=5, progress=lambda line: None)
    markdown = write_markdown(report).read_text()
    page = write_html(report).read_text()
    first = markdown.index("## ")
    assert markdown[first:].startswith("## Finding")  # the first section
    assert f"Verdict: {verdict}" in markdown and f"Verdict: {verdict}" in page
    assert "The report's claim** (section II): ResNet at lr 0.05 is best" in markdown
    assert ("Variants compared: A = model=resnet18, optim/lr=0.05; B = model=resnet18, optim/lr=0.1; "
            "C = model=vgg16, optim/lr=0.05; D = model=vgg16, optim/lr=0.1.") in markdown
    assert json.loads((study.path / "report" / "finding.json").read_text())["verdict"] == verdict
    table = variant_table(study)
    assert list(table["variant"]) == ["A", "B", "C", "D"] and (table["n"] == 3).all()
    best = table[table["best"]].iloc[0]
    assert best["setting"] == "model=resnet18, optim/lr=0.05"
    assert best["val/accuracy mean"] == pytest.approx(np.mean(results[("resnet18", 0.05)]))
    assert best["val/accuracy std"] == pytest.approx(np.std(results[("resnet18", 0.05)], ddof=1))
    runner_up = table[table["setting"] == "model=resnet18, optim/lr=0.1"].iloc[0]
    want = welch_interval(results[("resnet18", 0.1)], results[("resnet18", 0.05)])
    assert (runner_up["low"], runner_up["high"]) == pytest.approx((want.low, want.high))
    assert runner_up["excludes 0"] == (case == "clear")
    assert "Welch t over seeds" in markdown and "±" in markdown
    assert ("A difference counts only where its whole interval clears the minimum difference 0.005 in val/accuracy "
            "(half a percentage point" in markdown and "clears the minimum difference 0.005 in val/accuracy" in page)


def test_learning_curves_draw_the_seed_spread(tmp_path):
    curves = pd.DataFrame([{"trial": t, "epoch": e, "train/loss": base / e, "val/loss": base / e + 0.1,
                            "val/accuracy": 0.3 * e * base} for t, base in (("a", 1.0), ("b", 1.2), ("c", 2.0))
                           for e in (1, 2, 3)])
    figure = figures.learning_curves(curves, {}, "classification", "t", groups={"A (n=2)": ["a", "b"], "B": ["c"]})
    ax = figure.axes[0]
    assert len(ax.collections) == 2  # A's band for train and val loss; B (one seed) has none
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(1 / 3) and band.max() == pytest.approx(1.2)
    assert list(ax.lines[0].get_ydata()) == pytest.approx([1.1, 0.55, 1.1 / 3])  # the mean of the two seeds
    figures.save(figure, tmp_path / "curves.png")
    from analysis.report import who

    row = pd.Series({"label": "A.2", "trial": "train_x_abcde_00001", "setting": "optim/lr=0.1", "config/seed": 5})
    assert who(row) == "A.2 (trial abcde_00001: optim/lr=0.1, seed 5)"  # a figure's one seed is named


# ----------------------------------------------------------------------------- seeds
def test_samples_get_distinct_reproducible_seeds_in_tunes_grid_and_in_optuna(tmp_path):
    from ray import tune
    from ray.tune.search.variant_generator import generate_variants

    from studies.runner.tuner import SeededOptunaSearch

    base = ClassifyConfig(dataset="digits", seed=7)
    space = merge_space(base.to_dict(), {"optim": {"lr": tune.grid_search([0.1, 0.05])}})
    seeded, num_samples = seed_samples(space, base.seed, 3)
    assert num_samples == 1  # the count is unchanged: 2 grid points x 3 seeds
    configs = [spec for _, spec in generate_variants(seeded)]
    assert len(configs) == 6
    for lr in (0.1, 0.05):
        seeds = [c["seed"] for c in configs if c["optim"]["lr"] == lr]
        assert len(set(seeds)) == 3 and 7 in seeds  # sample 0 keeps --seed
    again = [spec for _, spec in generate_variants(seed_samples(space, base.seed, 3)[0])]
    assert [c["seed"] for c in again] == [c["seed"] for c in configs]
    assert {sample_seed(0, i) for i in range(3)}.isdisjoint({sample_seed(1, i) for i in range(1, 3)})
    assert seed_samples(space, 7, 1) == (space, 1)

    searcher = SeededOptunaSearch(7, space={"lr": tune.loguniform(1e-4, 1e-1)}, metric="val/loss", mode="min", seed=7)
    proposed = [searcher.suggest(f"trial{i}")["seed"] for i in range(3)]
    assert proposed == [sample_seed(7, i) for i in range(3)] and len(set(proposed)) == 3
    searcher.save(str(tmp_path / "searcher.pkl"))  # a resumed study continues the sequence
    resumed = SeededOptunaSearch(7, space={"lr": tune.loguniform(1e-4, 1e-1)}, metric="val/loss", mode="min", seed=7)
    resumed.restore(str(tmp_path / "searcher.pkl"))
    assert resumed.suggest("trial3")["seed"] == sample_seed(7, 3)


def test_the_same_seed_trains_the_same_and_another_seed_differently(tmp_path):
    from trainables import VAEConfig, run_trial
    from trainables.tune_io import LocalSession
    from trainables.vae import TASK

    def final(seed: int, folder: str) -> dict:
        config = VAEConfig(dataset="mnist5k", image_size=28, epochs=1, batch_size=32, steps_per_epoch=3,
                           val_samples=64, feature_samples=8, seed=seed, data_root=str(tmp_path / "data"))
        return run_trial(config.to_dict(), TASK, LocalSession(tmp_path / folder, cpus=1))

    first, repeat, other = final(0, "a"), final(0, "b"), final(sample_seed(0, 1), "c")
    assert first["val/loss"] == repeat["val/loss"] and first["train/loss"] == repeat["train/loss"]
    assert other["val/loss"] != first["val/loss"]


# ----------------------------------------------------------------------------- pretrained encoders
RESNET50_FILE = "resnet50-11ad3fa6.pth"  # the file name of torchvision's ResNet50_Weights.IMAGENET1K_V2


def test_pretrained_weights_are_resolved_on_the_driver_and_change_the_encoder(tmp_path, monkeypatch):
    from torchvision.models import resnet50

    from studies.runner.preflight import check_weights
    from vision_models import build_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    target = tmp_path / "hub" / "checkpoints" / RESNET50_FILE
    target.parent.mkdir(parents=True)
    torch.manual_seed(1)  # a stand-in for ImageNet's weights: every float tensor moved off its initial value
    state = {k: v + torch.rand_like(v) if v.is_floating_point() else v for k, v in resnet50().state_dict().items()}
    torch.save(state, target)
    config = SegmentConfig(dataset="shapes", image_size=32, pretrained=True)
    assert check_weights(config, {"skip_concat": {"grid_search": [True, False]}}) == [str(target)]
    assert check_weights(SegmentConfig(dataset="shapes", image_size=32), {}) == []  # from scratch: nothing needed
    torch.manual_seed(0)
    scratch = build_model("unet_resnet50", **{**config.model_kwargs(), "pretrained": False}).state_dict()
    torch.manual_seed(0)
    loaded = build_model("unet_resnet50", **config.model_kwargs()).state_dict()
    for key in ("encoder.conv1.weight", "encoder.layer3.5.conv3.weight", "encoder.bn1.running_mean"):
        assert torch.equal(loaded[key], state[key.removeprefix("encoder.")])
        assert not torch.equal(loaded[key], scratch[key])
    assert torch.equal(loaded["head.weight"], scratch["head.weight"])  # the decoder and head stay as built


def test_a_pretrained_study_offline_without_the_file_fails_before_ray_starts(tmp_path, study_env):
    # a dead proxy: every download attempt fails at once, as offline, on any machine (nothing is downloaded)
    env = {**study_env, "TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    start = time.time()
    done = subprocess.run(study_command("seg_concat", "--dataset", "shapes", "--image-size", "32", "--epochs", "1",
                                        "--storage", str(tmp_path / "results"), "--data-root", str(tmp_path / "data"),
                                        "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"),
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    expected = os.path.join(str(tmp_path / "torch"), "hub", "checkpoints", RESNET50_FILE)
    assert expected in done.stderr and "$TORCH_HOME/hub/checkpoints/" in done.stderr
    assert "--no-pretrained" in done.stderr
    assert not (tmp_path / "results" / "seg_concat").exists()  # no study started, no Ray
    assert "Started a local Ray instance" not in done.stdout + done.stderr
    assert time.time() - start < 240


@pytest.mark.slow
def test_a_study_with_samples_records_distinct_seeds_and_its_verdict(tmp_path, study_env):
    from mlflow.tracking import MlflowClient

    from studies.vae_lr import FINDING

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run(study_command("vae_lr", "--quick", "--epochs", "1", "--steps-per-epoch", "3",
                                        "--num-samples", "2", "--storage", str(tmp_path / "results"),
                                        "--mlflow-uri", uri), cwd=tmp_path, env=study_env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = tmp_path / "results" / "vae_lr"
    trials = pd.read_csv(folder / "trials.csv")
    assert len(trials) == 10  # 5 learning rates x 2 samples: the count --num-samples always gave
    seeds = trials.groupby("config/optim/lr")["config/seed"].apply(frozenset)
    assert (seeds.map(len) == 2).all() and seeds.nunique() == 1 and seeds.iloc[0] == {0, sample_seed(0, 1)}
    client = MlflowClient(tracking_uri=uri)
    runs = [run for run in client.search_runs([client.get_experiment_by_name("vae_lr").experiment_id])
            if "vision_tune.trial_id" in run.data.tags]  # the study's parent run aside
    assert sorted(int(run.data.params["seed"]) for run in runs) == sorted(trials["config/seed"])
    written = json.loads((folder / "finding.json").read_text())
    assert written["claim"] == FINDING.claim and written["n"] == 2
    assert f"verdict: {written['verdict']} (n=2" in done.stdout
    assert json.loads((folder / "study.json").read_text())["finding"]["best"] == {"optim/lr": 5e-4}


def test_no_pretrained_flag_and_quick_train_from_scratch():
    from studies.runner.cli import apply_args, build_parser
    from studies.seg_concat import BASE, SPACE
    from trainables import ConfigError, VAEConfig

    assert BASE.pretrained  # the segmentation studies default to the report's ImageNet encoder
    for flags in (["--no-pretrained"], ["--quick"]):
        base, _ = apply_args(BASE, SPACE, build_parser("seg_concat").parse_args(flags))
        assert base.pretrained is False and base.model_kwargs()["pretrained"] is False
    assert apply_args(BASE, SPACE, build_parser("seg_concat").parse_args([]))[0].pretrained
    with pytest.raises(ConfigError, match="--no-pretrained"):
        apply_args(VAEConfig(), {}, build_parser("vae_lr").parse_args(["--no-pretrained"]))
