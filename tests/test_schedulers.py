"""HyperBand and PBT beside FIFO and ASHA, end to end on quick studies, and the combinations they refuse."""
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
