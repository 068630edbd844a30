"""Tracking never holds the study up: an MLflow server stopped mid-study (and started again on the same port and
database, or never) while a real vae_lr study runs against it, the study's own results, and the replay.

The two outages run at once (each study's wait for a server overlaps the other's work): about a minute and a half
on 2 cores instead of three.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT, study_command
from servers import BIN, _answers, _process, free_port
from studies.runner.tracking import StudyTracker
from studies.runner.tracking_queue import DRAIN_ENV, SHORT_HTTP

AWAY, BACK = "MLflow tracking away since", "MLflow tracking back at"
OUTAGE_S = 20
# one trial (Optuna draws its learning rate: vae_lr's grid has five), 3 batches an epoch: 0.3-1 s each on 2 cores
SMALL = ["--quick", "--search", "optuna", "--num-samples", "1", "--steps-per-epoch", "3"]
KEYS = ("epoch", "val/loss", "train/loss")


@contextlib.contextmanager
def tracking_server(folder: Path, port: int):
    """``mlflow server`` on 127.0.0.1:``port`` with its runs in ``folder/mlflow.db`` (kept when it stops, so that a
    server started again finds them) and artifacts in ``folder/artifacts``."""
    url = f"http://127.0.0.1:{port}"
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
           "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with _process(cmd, "mlflow server", _answers(f"{url}/health"), folder / "server.log", env=env, cwd=folder):
        yield url


@contextlib.contextmanager
def running_study(tmp: Path, url: str, epochs: int, env: dict | None = None):
    """``studies/vae_lr.py`` in a process group of its own, its output in ``tmp/out`` and ``tmp/err``; killed if
    it is still running when the block ends."""
    args = [*SMALL, "--epochs", str(epochs), "--storage", str(tmp / "results"), "--mlflow-uri", url]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0", **(env or {})}
    with open(tmp / "out", "w") as out, open(tmp / "err", "w") as err:
        proc = subprocess.Popen(study_command("vae_lr", *args), cwd=tmp, env=env, stdout=out, stderr=err,
                                start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_first_epoch(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until a trial's first epoch reached MLflow (the study folder's result.json lags the driver's by a snapshot)."""
    client, start = MlflowClient(tracking_uri=url), time.monotonic()
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"the study exited ({proc.returncode}) before its first epoch")
        if time.monotonic() - start > timeout:
            raise AssertionError(f"no epoch reported in {timeout} s")
        experiment = client.get_experiment_by_name("vae_lr")
        if experiment and client.search_runs([experiment.experiment_id], "metrics.epoch >= 1", max_results=1):
            return
        time.sleep(0.2)


def ended(proc: subprocess.Popen, tmp: Path, timeout: float = 400) -> dict:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the study did not end in {timeout} s:\n{(tmp / 'err').read_text()[-3000:]}") from None
    return {"code": proc.returncode, "out": (tmp / "out").read_text(), "err": (tmp / "err").read_text()}


def reports(study: Path) -> dict[str, list[dict]]:
    """Each trial folder's reports, as Tune's result.json holds them."""
    return {path.parent.name: [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            for path in study.glob("*/result.json")}


def mlflow_state(url: str) -> dict:
    """What the server holds of the study: per run, its status, name, tags, each metric's steps and artifacts."""
    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("vae_lr")
    state = {}
    for run in client.search_runs([experiment.experiment_id]):
        keys = ("best/val/loss",) if "vision_tune.study_run" in run.data.tags else KEYS
        state[run.data.tags.get("vision_tune.trial_id")] = {
            "status": run.info.status, "name": run.info.run_name, "tags": run.data.tags,
            "steps": {key: sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) for key in keys},
            "artifacts": [a.path for a in client.list_artifacts(run.info.run_id, "artifacts")]}
    return state


def outage_and_return(tmp: Path) -> dict:
    """The server stopped at the study's first epoch and started again OUTAGE_S later on the same port and database."""
    epochs, port, folder = 60, free_port(), tmp / "server"
    folder.mkdir()
    with contextlib.ExitStack() as stack:
        with tracking_server(folder, port) as url:
            proc = stack.enter_context(running_study(tmp, url, epochs))
            wait_first_epoch(url, proc)
        stopped = time.time()  # the server's process group is gone
        time.sleep(max(0.0, stopped + OUTAGE_S - time.time()))
        restarted = time.time()
        with tracking_server(folder, port):
            return {**ended(proc, tmp), "epochs": epochs, "stopped": stopped, "restarted": restarted,
                    "reports": reports(tmp / "results" / "vae_lr"), "mlflow": mlflow_state(url)}


def outage_for_good(tmp: Path) -> dict:
    """The server stopped at the study's first epoch, started again only after the study ended: then the replay
    that the study printed, twice."""
    epochs, port, folder = 4, free_port(), tmp / "server"
    folder.mkdir()
    study = tmp / "results" / "vae_lr"
    with contextlib.ExitStack() as stack:
        with tracking_server(folder, port) as url:
            proc = stack.enter_context(running_study(tmp, url, epochs, env={DRAIN_ENV: "3"}))
            wait_first_epoch(url, proc)
        result = {**ended(proc, tmp), "epochs": epochs, "url": url, "study": study}
    result["table"] = pd.read_csv(study / "trials.csv")
    result["reports"] = reports(study)
    command = next((line.strip() for line in result["out"].splitlines() if "studies.runner.replay" in line), "")
    result["command"] = command
    if not command.startswith("python "):
        return result
    replay = [sys.executable, *shlex.split(command)[1:]]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tracking_server(folder, port):
        result["replay"] = subprocess.run(replay, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
        result["mlflow"] = mlflow_state(url)
        result["again"] = subprocess.run(replay, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
        result["mlflow_again"] = mlflow_state(url)
    return result


@pytest.fixture(scope="module")
def outages(tmp_path_factory) -> dict[str, cf.Future]:
    """Both outages at once; each test reads its own (``.result()`` raises what went wrong in it)."""
    with cf.ThreadPoolExecutor(2) as pool:
        futures = {"return": pool.submit(outage_and_return, tmp_path_factory.mktemp("return")),
                   "for_good": pool.submit(outage_for_good, tmp_path_factory.mktemp("for_good"))}
        cf.wait(futures.values())
    return futures


def assert_every_epoch_once(state: dict, reported: dict[str, list[dict]], epochs: int) -> None:
    """Every trial's run holds each of its epochs once (each metric), its artifacts, and is FINISHED; so is the
    study's run, with its best trial and one best value."""
    assert len(state) == len(reported) + 1, sorted(run["name"] for run in state.values())
    for folder, rows in reported.items():
        assert sorted(row["epoch"] for row in rows) == list(range(1, epochs + 1)), folder
        run = state[rows[0]["trial_id"]]
        assert run["status"] == "FINISHED" and run["name"].startswith("A "), (folder, run["status"], run["name"])
        assert run["steps"] == {key: list(range(1, epochs + 1)) for key in KEYS}, (folder, run["steps"])
        assert "artifacts/meta.json" in run["artifacts"], (folder, run["artifacts"])
    parent = state[None]
    assert parent["status"] == "FINISHED" and parent["tags"]["vision_tune.best_trial"] in state
    assert parent["steps"]["best/val/loss"] == [0], parent["steps"]


def test_callbacks_only_queue_while_the_server_is_away(caplog, monkeypatch):
    """No Ray: the tracker's calls from Tune's loop return at once with nothing listening, and the end names the
    runs left incomplete and their replay after the bounded wait."""
    monkeypatch.setenv(DRAIN_ENV, "1")
    for name, value in SHORT_HTTP.items():  # what the tracker sets in a driver, put back after the test
        monkeypatch.setenv(name, value)
    url = f"http://127.0.0.1:{free_port()}"
    tracker = StudyTracker(url, "vae_lr")
    tracker.plan("/results/vae_lr", {"metric": "val/loss"}, [{"optim/lr": 0.1}, {"optim/lr": 0.2}])
    caplog.set_level(logging.WARNING)
    start = time.perf_counter()
    for trial_id, lr in (("abcde_00000", 0.1), ("abcde_00001", 0.2)):
        tracker.trial_started(trial_id, f"train_vae_{trial_id}", {"optim": {"lr": lr}})
        for epoch in range(1, 51):
            tracker.trial_result(trial_id, {"epoch": epoch, "val/loss": 1.0 / epoch, "timestamp": time.time()})
        tracker.trial_ended(trial_id, "FINISHED")
    assert time.perf_counter() - start < 0.5  # 104 records queued; none sent
    table = pd.DataFrame({"trial": ["train_vae_abcde_00000", "train_vae_abcde_00001"], "status": ["OK", "OK"],
                          "val/loss": [0.02, 0.03], "epoch": [50, 50]})
    lines = tracker.end_study(table, "val/loss", "min")
    assert tracker.incomplete is not None and tracker.incomplete.trials == list(table["trial"])
    command = f"python -m studies.runner.replay /results/vae_lr --mlflow-uri {url}"
    assert tracker.incomplete.command == command and lines[-1] == f"  {command}"
    assert "2 trial run(s) left incomplete: train_vae_abcde_00000, train_vae_abcde_00001" in lines[0]
    assert len([r for r in caplog.records if r.getMessage().startswith(AWAY)]) == 1
    assert tracker.ui_lines() == [f"MLflow UI: {url} (experiment 'vae_lr')"]  # asks the absent server nothing


@pytest.mark.slow
def test_a_study_goes_on_while_the_server_is_away_and_every_epoch_arrives_once(outages):
    run = outages["return"].result()
    assert run["code"] == 0, run["out"][-2000:] + run["err"][-3000:]
    # Tune's loop never waited for MLflow, so the trial kept reporting while it was away (blocked, it reports
    # one epoch at most: its report waits for the driver's loop)
    during = [row["epoch"] for rows in run["reports"].values() for row in rows
              if run["stopped"] + 1 < row["timestamp"] < run["restarted"] - 1]
    assert len(during) >= 5, (during, run["stopped"], run["restarted"])
    assert_every_epoch_once(run["mlflow"], run["reports"], run["epochs"])
    away = [line for line in run["err"].splitlines() if AWAY in line]
    back = [line for line in run["err"].splitlines() if BACK in line]
    assert len(away) == 1 and len(back) == 1, "\n".join(away + back)
    replayed = re.search(r"after (\d+) s away: (\d+) records replayed", back[0])
    assert replayed and int(replayed.group(2)) > 0 and int(replayed.group(1)) >= OUTAGE_S, back[0]


@pytest.mark.slow
def test_a_server_that_never_comes_back_leaves_a_replay_that_sends_everything_once(outages):
    run = outages["for_good"].result()
    assert "Traceback" not in run["err"], run["err"][-3000:]
    assert run["code"] == 4, run["err"][-3000:]  # the results are complete, MLflow is not: README, "Exit codes"
    assert "error: the results are complete, but MLflow lacks the records of 1 trial run(s)" in run["err"]
    table = run["table"]  # the results are complete
    assert list(table["status"]) == ["OK"] and list(table["epoch"]) == [run["epochs"]]
    assert [len(rows) for rows in run["reports"].values()] == [run["epochs"]]
    # the run whose records the server never got, and the one command that sends them
    assert f"1 trial run(s) left incomplete: {table['trial'][0]}, and the study's run" in run["out"], run["out"][-3000:]
    assert run["command"] == f"python -m studies.runner.replay {run['study']} --mlflow-uri {run['url']}"
    replay, again = run["replay"], run["again"]
    assert replay.returncode == 0, replay.stdout[-2000:] + replay.stderr[-3000:]
    assert "1 trial run(s) completed" in replay.stdout, replay.stdout
    assert_every_epoch_once(run["mlflow"], run["reports"], run["epochs"])
    assert again.returncode == 0 and "nothing to replay" in again.stdout, again.stdout + again.stderr[-2000:]
    assert run["mlflow_again"] == run["mlflow"]  # idempotent
