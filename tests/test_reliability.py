"""Faults, interruptions and bad input: each test is named for what the project survives."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
from mlflow.tracking import MlflowClient
from ray import tune

from conftest import run_in_process, study_command
from studies.runner import run_study
from studies.runner.errors import TRIALS_FAILED
from studies.runner.preflight import ResourceError
from trainables import ConfigError, OptimConfig, SegmentConfig, VAEConfig
from trainables.tune_io import LocalSession, run_trial
from trainables.vae import TASK as VAE_TASK


def _argv(tmp_path: Path, *extra: str) -> list[str]:
    return ["--quick", "--storage", str(tmp_path / "results"), "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            *extra]


def _history(tmp_path: Path, study: str) -> dict[str, tuple[str, list[int]]]:
    """trial id -> (MLflow run status, epochs of its val/loss history)."""
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(study)
    runs = client.search_runs([experiment.experiment_id])
    return {run.data.tags["vision_tune.trial_id"]: (
        run.info.status, [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")]) for run in runs
        if "vision_tune.trial_id" in run.data.tags}  # the study's parent run aside


def _epoch_two_worker(study: Path, deadline: float) -> tuple[Path | None, int | None]:
    """The bce trial's folder and worker pid once that worker has written its epoch-2 checkpoint (Tune writes
    params.json and result.json as the trial runs: a file caught empty or mid-write is read again)."""
    while time.time() < deadline:
        for params in study.glob("*/params.json"):
            trial = params.parent
            try:
                if json.loads(params.read_text())["loss"] != "bce" or not (trial / "checkpoint_000001").is_dir():
                    continue
                first = (trial / "result.json").read_text().splitlines()[:1]
                if first:
                    return trial, json.loads(first[0])["pid"]
            except (OSError, ValueError):
                continue
        time.sleep(0.02)
    return None, None


def test_survives_a_trial_worker_killed_mid_epoch(tmp_path, study_env, data_root):
    """SIGKILL of the worker in epoch 3: retried from the epoch-2 checkpoint, same final metrics, every epoch kept
    in Tune's results and in one MLflow run."""
    study = tmp_path / "results" / "vae_losses"
    args = _argv(tmp_path, "--epochs", "3", "--steps-per-epoch", "40", "--max-failures", "1", "--max-concurrent", "1",
                 "--data-root", str(data_root), "--checkpoint-every", "1")
    driver = subprocess.Popen(study_command("vae_losses", *args), cwd=tmp_path, env=study_env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        victim, pid = _epoch_two_worker(study, deadline=time.time() + 240)
        assert pid is not None, "the bce trial never reached its second checkpoint"
        assert not (victim / "checkpoint_000002").exists(), "too late: the trial finished before the kill"
        os.kill(pid, signal.SIGKILL)  # inside epoch 3, with epoch 2's result maybe not yet in storage
        out, _ = driver.communicate(timeout=400)
    finally:
        if driver.poll() is None:  # a failed check must not leave the study running, blocked on its full pipe
            driver.kill()
            driver.communicate()
    assert driver.returncode == 0, out[-4000:]

    epochs = [json.loads(line)["epoch"] for line in (victim / "result.json").read_text().splitlines()]
    assert epochs[0] == 1 and epochs[-1] == 3 and sorted(set(epochs)) == [1, 2, 3]
    final = json.loads((victim / "result.json").read_text().splitlines()[-1])
    config = VAEConfig.from_dict(json.loads((victim / "params.json").read_text()))
    undisturbed = run_trial(config.to_dict(), VAE_TASK, LocalSession(tmp_path / "undisturbed", cpus=1))
    for key in ("train/loss", "val/loss", "val/kl"):
        assert final[key] == pytest.approx(undisturbed[key], rel=1e-5), key
    trial_id = final["trial_id"]
    status, steps = _history(tmp_path, "vae_losses")[trial_id]
    assert status == "FINISHED" and steps == [1, 2, 3]  # one run, full history, no duplicate epoch
    assert len(_history(tmp_path, "vae_losses")) == 3


NAN_STUDY = """from ray import tune
from studies.runner import run_study
from trainables import OptimConfig, VAEConfig

BASE = VAEConfig(dataset="mnist5k", image_size=28, epochs=2, steps_per_epoch=10, optim=OptimConfig("sgd", 1e-3))
SPACE = {"optim": {"lr": tune.grid_search([1e-3, 1e12])}}
if __name__ == "__main__":
    run_study("nan_study", BASE, SPACE, "val/loss", "min")
"""


def test_survives_a_nan_trial_while_the_others_finish_and_exits_3_naming_it(tmp_path, study_env):
    """A study a user's script runs: the good trial finishes, everything is written, and the exit status and
    the last line say that a trial failed and where its error is."""
    script = tmp_path / "nan_study.py"
    script.write_text(NAN_STUDY)
    done = run_in_process(str(script), _argv(tmp_path, "--steps-per-epoch", "10"), tmp_path, study_env)
    assert done.returncode == TRIALS_FAILED == 3, done.stdout[-3000:] + done.stderr[-3000:]
    study = tmp_path / "results" / "nan_study"
    table = pd.read_csv(study / "trials.csv")
    assert list(table["status"]) == ["OK", "ERROR"]  # sorted by the metric, the failed trial last
    failed = table.iloc[1]
    assert float(failed["config/optim/lr"]) == 1e12
    assert "loss became nan" in failed["error"] or "loss became inf" in failed["error"]
    assert "epoch 1, step" in failed["error"] and "1000000000000" in failed["error"]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: 1 of 2 trial(s) failed; their errors are in {study}/trials.csv (column 'error') and in full in "
        f"{study}/{failed['trial']}/error.txt")
    assert (study / failed["trial"] / "error.txt").is_file()
    record = json.loads((study / "study.json").read_text())
    assert record["state"] == "finished" and record["invocations"][-1]["failed_trials"] == 1
    statuses = sorted(status for status, _ in _history(tmp_path, "nan_study").values())
    assert statuses == ["FAILED", "FINISHED"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BAD_INPUT = [
    ("unknown model", dict(model="vgg19"), "model: got 'vgg19'; valid values are 'unet_resnet50', 'segnet_vgg16'"),
    ("unknown dataset", dict(dataset="coco"), "dataset: got 'coco'"),
    ("lr <= 0", dict(optim={"name": "sgd", "lr": 0.0}), "optim.lr: must be a number > 0"),
    ("momentum >= 1", dict(optim={"name": "sgd", "lr": 0.1, "momentum": 1.0}), "optim.momentum: must be in [0, 1)"),
    ("background weight > 1", dict(class_weights=2.0), "class_weights: got 2.0"),
    ("background weight 0", dict(class_weights=0.0), "background weight in (0, 1]"),
    ("image size", dict(image_size=70), "nearest valid 64"),
]


@pytest.mark.parametrize("case,fields,message", [c for c in BAD_INPUT if c[2]], ids=[c[0] for c in BAD_INPUT if c[2]])
def test_bad_config_fails_naming_the_field(case, fields, message):
    with pytest.raises(ConfigError) as err:
        SegmentConfig(**{"dataset": "shapes", "image_size": 64, **fields})
    assert message in str(err.value)


@pytest.mark.parametrize("make,message", [
    (lambda: OptimConfig(name="rmsprop"), "optim.name: got 'rmsprop'; valid values are 'sgd', 'adam'"),
    (lambda: VAEConfig(loss="l1"), "loss: got 'l1'; valid values are 'bce', 'mse', 'bce+mse'"),
    (lambda: VAEConfig(latent_dim=0), "latent_dim: must be an integer >= 1"),
    (lambda: OptimConfig(lr=-1.0), "optim.lr: must be a number > 0"),
    (lambda: OptimConfig(momentum=-0.1), "optim.momentum"),
])
def test_bad_values_fail_with_the_valid_ones(make, message):
    with pytest.raises(ConfigError) as err:
        make()
    assert message in str(err.value)


@pytest.mark.parametrize("space,argv,error,message", [
    ({"learning_rate": tune.grid_search([0.1])}, [], ConfigError, "'learning_rate' is not a field of SegmentConfig"),
    ({"optim": {"beta1": tune.grid_search([0.9])}}, [], ConfigError, "optim key(s) ['beta1'] unknown"),
    ({"class_weights": tune.grid_search([0.1, 5.0])}, [], ConfigError, "class_weights: got 5.0"),
    ({}, ["--dataset", "voc", "--data-root", "/nonexistent/vt"], FileNotFoundError, "/nonexistent/vt"),
    ({}, ["--mlflow-uri", "http://127.0.0.1:{port}"], ConnectionError, "no MLflow server answers at http://127.0.0.1"),
    ({}, ["--cpus-per-trial", "64"], ResourceError, "--cpus-per-trial 64"),
], ids=["space key", "optim key", "space value", "data root", "mlflow server", "cpus"])
def test_bad_input_fails_before_any_trial_starts(space, argv, error, message, tmp_path):
    argv = [a.format(port=_free_port()) for a in argv]
    base = SegmentConfig(model="unet_resnet50", dataset="voc", epochs=1)
    with pytest.raises(error) as err:
        run_study("bad_input", base, space, "val/precision", "max", argv=_argv(tmp_path, "--image-size", "32", *argv))
    assert message in str(err.value)
    assert not ray.is_initialized()  # Ray was stopped again (or never started)
    assert not list((tmp_path / "results").glob("bad_input/*/result.json"))


def test_data_root_without_the_voc_layout_names_the_missing_path(tmp_path):
    root = tmp_path / "data"
    (root / "VOCdevkit" / "VOC2012" / "JPEGImages").mkdir(parents=True)
    base = SegmentConfig(dataset="voc", epochs=1, image_size=32)
    with pytest.raises(FileNotFoundError) as err:
        run_study("bad_root", base, {}, "val/precision", "max", argv=_argv(tmp_path, "--data-root", str(root),
                                                                          "--dataset", "voc"))
    assert "SegmentationClass" in str(err.value) or "ImageSets" in str(err.value)
    assert str(root) in str(err.value)
