"""Studies written by earlier versions still resume: Tune pickles the runner's callbacks, trial-folder namer and
search algorithm by module path into each study's snapshot, so moving them must keep the old paths importable.

``fixtures/snapshot_2026_12/`` holds two ``vae_lr --quick --epochs 1 --steps-per-epoch 1`` studies (a grid and an
Optuna search) written by the code of 2026-12-06, before the runner became a package; their checkpoints were
removed to keep the fixture small (the trials had finished, so a resume needs none).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil

import pandas as pd
import pytest

from conftest import ROOT, run_in_process

FIXTURES = ROOT / "tests" / "fixtures" / "snapshot_2026_12"
FLAGS = {"grid": [], "optuna": ["--search", "optuna", "--num-samples", "2"]}


@pytest.mark.parametrize("search", sorted(FLAGS))
def test_the_pickles_of_an_old_snapshot_load(search):
    """tuner.pkl (callbacks, namer, search algorithm) and the searcher's state name only importable classes."""
    import cloudpickle  # noqa: F401 - Tune's pickles need it importable, as on restore

    folder = FIXTURES / search / "vae_lr"
    for path in [folder / "tuner.pkl", *folder.glob("searcher-state-*.pkl")]:
        with open(path, "rb") as stream:
            assert pickle.load(stream) is not None, path


@pytest.mark.slow
@pytest.mark.parametrize("search", sorted(FLAGS))
def test_a_study_written_before_the_runner_package_resumes(search, tmp_path, data_root):
    storage = tmp_path / "results"
    shutil.copytree(FIXTURES / search / "vae_lr", storage / "vae_lr")
    record_path = storage / "vae_lr" / "study.json"
    record = json.loads(record_path.read_text())
    record["base"]["data_root"] = str(data_root)  # the fixture's machine kept its data elsewhere
    record_path.write_text(json.dumps(record))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    args = ["--quick", "--epochs", "1", "--steps-per-epoch", "1", "--data-root", str(data_root), *FLAGS[search],
            "--storage", str(storage), "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--resume"]
    done = run_in_process(str(ROOT / "studies" / "vae_lr.py"), args, tmp_path, env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(record_path.read_text())
    assert [entry["state"] for entry in record["invocations"]][-1] == "finished"
    assert record["invocations"][-1]["resume"] is True
    table = pd.read_csv(storage / "vae_lr" / "trials.csv")
    assert len(table) == (5 if search == "grid" else 2) and set(table["status"]) == {"OK"}
