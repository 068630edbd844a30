"""HyperBand and PBT beside FIFO and ASHA, two objectives through Optuna, end to end on quick studies, and the
combinations they refuse."""
from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from conftest import ROOT, run_in_process

pytestmark = pytest.mark.slow


def run(tmp_path, script: str, *flags: str):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    args = ["--quick", "--storage", str(tmp_path / "results"), "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            *flags]
    return run_in_process(str(ROOT / "studies" / f"{script}.py"), args, tmp_path, env)


def reports(study) -> dict[str, list[dict]]:
    return {path.parent.name: [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            for path in study.glob("*/result.json")}


def test_pbt_copies_the_best_trials_and_perturbs_their_learning_rate(tmp_path):
    done = run(tmp_path, "vae_lr", "--epochs", "4", "--steps-per-epoch", "3", "--scheduler", "pbt", "--pbt-interval", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    study = tmp_path / "results" / "vae_lr"
    table = pd.read_csv(study / "trials.csv")
    assert len(table) == 5 and set(table["status"]) == {"OK"} and set(table["epoch"]) == {4}
    rows = reports(study)
    for trial, trial_rows in rows.items():  # paused and resumed at every perturbation: no epoch lost from Tune's results
        assert sorted({r["epoch"] for r in trial_rows}) == [1, 2, 3, 4], (trial, [r["epoch"] for r in trial_rows])
    # the lineage, from the trials' own reports: who copied whom, at which epoch, with which learning rate after
    copies = [(trial, r["restored_from"], r["restored_epoch"], r["config"]["optim"]["lr"])
              for trial, trial_rows in rows.items() for r in trial_rows if r.get("restored_from")]
    assert copies, "PBT exploited no trial in 4 epochs of 5 trials"
    assert all(source in rows for _, source, _, _ in copies)
    assert all(lr in (5e-3, 1e-3, 5e-4, 1e-4, 5e-5) for *_, lr in copies)  # perturbed to a neighbouring grid value
    finding = json.loads((study / "finding.json").read_text())
    assert finding["verdict"] == "not testable here" and "PBT" in finding["measured"]
    record = json.loads((study / "study.json").read_text())
    assert record["scheduler"] == "pbt" and record["base"]["checkpoint_every"] == "1"  # lined up with PBT's interval
    report = run_in_process("-m analysis", [str(study), "--no-mlflow"], tmp_path, {**os.environ, "PYTHONPATH": str(ROOT)})
    assert report.returncode == 0, report.stderr[-3000:]
    lineage = pd.read_csv(study / "report" / "data" / "lineage.csv").fillna({"restored_from": ""})
    drawn = lineage[(lineage["restored_from"] != "") & (lineage["restored_from"] != lineage["trial"])]
    assert len(drawn) >= 1 and (study / "report" / "lineage.png").stat().st_size > 0


def test_hyperband_pauses_and_resumes_trials_to_the_end(tmp_path):
    done = run(tmp_path, "vae_lr", "--epochs", "3", "--steps-per-epoch", "2", "--scheduler", "hyperband")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = pd.read_csv(tmp_path / "results" / "vae_lr" / "trials.csv")
    assert len(table) == 5 and set(table["status"]) == {"OK"}
    assert table["epoch"].max() == 3  # the best went the whole way; HyperBand may stop the others early
    for trial in reports(tmp_path / "results" / "vae_lr").values():  # a paused trial resumed where it stopped
        epochs = [r["epoch"] for r in trial]
        assert epochs == sorted(set(epochs)), epochs


@pytest.mark.parametrize("flags,message", [
    (["--scheduler", "pbt", "--search", "optuna"], "--scheduler pbt --search optuna: PBT refuses search algorithms"),
    (["--scheduler", "pbt", "--pbt-interval", "0"], "--pbt-interval 0: must be an integer >= 1"),
])
def test_what_pbt_refuses_in_one_line(tmp_path, flags, message):
    done = run(tmp_path, "vae_lr", *flags)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_pbt_needs_a_real_valued_grid(tmp_path):
    done = run(tmp_path, "seg_concat", "--scheduler", "pbt", "--image-size", "32")  # skip_concat: booleans only
    assert done.returncode == 2 and "--scheduler pbt: this study's space has no grid of real numbers" in done.stderr


def test_two_objectives_search_a_pareto_front_the_report_draws(tmp_path):
    done = run(tmp_path, "vae_latent", "--epochs", "1", "--steps-per-epoch", "2", "--num-samples", "6",
               "--metric", "val/loss", "--metric", "model/params_m")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    study = tmp_path / "results" / "vae_latent"
    record = json.loads((study / "study.json").read_text())
    assert record["search"] == "optuna" and record["objectives"] == [["val/loss", "min"], ["model/params_m", "min"]]
    table = pd.read_csv(study / "trials.csv")
    assert len(table) == 6 and table["model/params_m"].nunique() > 1  # the latent size changes the model's size
    from analysis.tables import pareto_front

    front = pareto_front(table, [("val/loss", "min"), ("model/params_m", "min")])
    line = next(line for line in done.stdout.splitlines() if line.startswith("Pareto front"))
    assert all(name in line for name in front["name"]) and len(front) >= 1
    for _, row in table[table["status"] == "OK"].iterrows():  # nothing outside the front beats a front trial on both
        beaten = front[(front["val/loss"] > row["val/loss"]) & (front["model/params_m"] > row["model/params_m"])]
        assert beaten.empty, row["name"]
    report = run_in_process("-m analysis", [str(study), "--no-mlflow"], tmp_path,
                            {**os.environ, "PYTHONPATH": str(ROOT)})
    assert report.returncode == 0, report.stderr[-3000:]
    assert (study / "report" / "pareto.png").stat().st_size > 0
    assert set(pd.read_csv(study / "report" / "data" / "pareto.csv")["name"]) == set(front["name"])


@pytest.mark.parametrize("flags,message", [
    (["--metric", "val/loss", "--metric", "model/params_m", "--scheduler", "asha"],
     "--metric twice --scheduler asha: ASHA, HyperBand and PBT rank trials on one metric"),
    (["--metric", "val/los"], "--metric val/los: expected NAME[:max|min] with NAME one of val/loss"),
    (["--metric", "val/loss", "--metric", "val/kl", "--metric", "model/params_m"], "--metric given 3 times"),
])
def test_what_two_objectives_refuse_in_one_line(tmp_path, flags, message):
    done = run(tmp_path, "vae_lr", *flags)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
