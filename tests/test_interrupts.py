"""Ctrl-C and SIGTERM stop a study honestly, and resume finishes it with every trial exactly once."""
from __future__ import annotations

import json
import os
import pickle
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from mlflow.tracking import MlflowClient

from analysis.load import load_study
from analysis.progress import describe
from analysis.tables import ranked
from conftest import study_command
from studies.runner.tracking_queue import answers

EPOCHS = 2
TRIALS = 5  # vae_lr's learning rates


def _snapshot(study: Path) -> dict[str, str]:
    """Trial folder -> status in Tune's newest experiment snapshot ({} while there is none or it is mid-write)."""
    from analysis.ray_internals import parse_snapshot

    try:
        return parse_snapshot(sorted(study.glob("experiment_state-*.json"))[-1].read_text())
    except (IndexError, ValueError, OSError):
        return {}


def _trial_states(study: Path) -> list[dict]:
    """Tune's own record of each trial in the newest snapshot (resources, retries, status)."""
    snapshot = json.loads(sorted(study.glob("experiment_state-*.json"))[-1].read_text())
    return [json.loads(state) for state, _ in snapshot["trial_data"]]


def _reports(study: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in study.glob("*/result.json"))


def _start(args: list[str], cwd: Path, env: dict, log: str) -> subprocess.Popen:
    with open(cwd / f"{log}.out", "w") as out, open(cwd / f"{log}.err", "w") as err:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True)


def _wait_for(condition, driver: subprocess.Popen, what: str, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert driver.poll() is None, f"the study ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _resume_command(stderr: str) -> list[str]:
    """The command the interrupted study printed as its next step, run with this interpreter."""
    lines = stderr.strip().splitlines()
    assert lines[-2].startswith("interrupted (") and "continue with:" in lines[-2], stderr[-2000:]
    command = shlex.split(lines[-1])
    assert command[0] == "python" and command[-1] == "--resume"
    return [sys.executable, *command[1:]]


def _runs(db: Path) -> dict[str, tuple[str, list[int]]]:
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("vae_lr")
    return {run.data.tags["vision_tune.trial_id"]: (run.info.status, [
        m.step for m in client.get_metric_history(run.info.run_id, "val/loss")])
        for run in client.search_runs([experiment.experiment_id], "tags.`vision_tune.study` != ''")
        if "vision_tune.trial_id" in run.data.tags}  # the study's parent run aside


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_interrupted_study_is_recorded_honestly_and_resume_runs_each_trial_once(tmp_path, study_env):
    study, db = tmp_path / "results" / "vae_lr", tmp_path / "mlflow.db"
    first = study_command("vae_lr", "--quick", "--storage", str(tmp_path / "results"), "--mlflow-uri",
                          f"sqlite:///{db}", "--epochs", str(EPOCHS), "--steps-per-epoch", "5", "--max-concurrent", "2",
                          "--checkpoint-every", "1")  # a checkpoint an epoch: Tune snapshots the study as often

    # 1. Ctrl-C once a trial has finished and others have not
    driver = _start(first, tmp_path, study_env, "sigint")
    _wait_for(lambda: "TERMINATED" in _snapshot(study).values(), driver, "a trial finished")
    driver.send_signal(signal.SIGINT)
    assert driver.wait(timeout=300) == 130, (tmp_path / "sigint.err").read_text()[-3000:]
    resume = _resume_command((tmp_path / "sigint.err").read_text())
    table = pd.read_csv(study / "trials.csv")
    assert set(table["status"]) <= {"OK", "INTERRUPTED", "NOT_STARTED"} and (table["status"] == "OK").any()
    assert len(table) < TRIALS or not (table["status"] == "OK").all(), "the interruption cut nothing short"
    assert (table.loc[table["status"] == "OK", "epoch"] == EPOCHS).all()  # OK = all its epochs, nothing less
    assert "INCOMPLETE" in (tmp_path / "sigint.out").read_text()
    statuses = dict(zip(table["trial"].str.rsplit("_", n=2).str[-2:].str.join("_"), table["status"]))
    for trial_id, (run_status, _) in _runs(db).items():
        assert run_status == {"OK": "FINISHED", "INTERRUPTED": "KILLED"}[statuses[trial_id]], (trial_id, run_status)
    report = load_study(study)
    assert report.state == "interrupted" and not report.complete
    assert ranked(report).loc[lambda t: t["status"] != "OK", "rank"].isna().all()  # never "best"

    # 2. resume, then SIGTERM: stopped the same way, and no Ray process outlives the driver
    reported = _reports(study)
    driver = _start(resume, tmp_path, study_env, "sigterm")
    _wait_for(lambda: _reports(study) > reported, driver, "the resumed study reported an epoch")
    assert load_study(study).state == "running"  # python -m analysis now says so, instead of "complete"
    ray_processes = [p for p in psutil.process_iter() if _in_session(p, driver.pid)]
    assert len(ray_processes) > 2, "expected the driver, Ray's GCS/raylet and workers"
    driver.send_signal(signal.SIGTERM)
    assert driver.wait(timeout=300) == 143, (tmp_path / "sigterm.err").read_text()[-3000:]
    _, alive = psutil.wait_procs(ray_processes, timeout=30)
    assert not [(p.pid, _name(p)) for p in alive], "Ray processes outlived the driver"
    assert _resume_command((tmp_path / "sigterm.err").read_text()) == resume

    # 3. resume again, now logging through an MLflow server on the same store, with other resources and retries:
    # all applied (to the trials still to run: the SIGTERM may have let the last running ones finish)
    before = {trial["trial_id"]: trial["status"] for trial in _trial_states(study)}
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                               str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{db}"],
                              cwd=tmp_path, env={**study_env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(lambda: answers(f"http://127.0.0.1:{port}", timeout=2), server, "the MLflow server", timeout=120)
        done = subprocess.run([*resume, "--mlflow-uri", f"http://127.0.0.1:{port}", "--cpus-per-trial", "0.5",
                               "--max-failures", "2"], cwd=tmp_path, env=study_env, capture_output=True, text=True,
                              timeout=600)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resume applies --mlflow-uri" in done.stderr

    table = pd.read_csv(study / "trials.csv")
    assert len(table) == TRIALS and (table["status"] == "OK").all() and (table["epoch"] == EPOCHS).all()
    folders = sorted(p.parent.name for p in study.glob("*/params.json"))
    assert folders == sorted(table["trial"])  # each trial once in Tune, with all its epochs, none twice
    for trial in folders:
        epochs = [json.loads(line)["epoch"] for line in (study / trial / "result.json").read_text().splitlines()]
        assert sorted(set(epochs)) == list(range(1, EPOCHS + 1)), (trial, epochs)
    runs = _runs(db)
    assert len(runs) == TRIALS  # each trial once in MLflow, whichever URI logged it
    assert all(status == "FINISHED" and steps == list(range(1, EPOCHS + 1)) for status, steps in runs.values()), runs
    record = json.loads((study / "study.json").read_text())
    assert [entry["state"] for entry in record["invocations"]] == ["interrupted", "interrupted", "finished"]
    assert record["mlflow_uri"] == f"http://127.0.0.1:{port}" and record["state"] == "finished"
    assert record["invocations"][-1]["applied"] == [f"--mlflow-uri 'sqlite:///{db}' -> 'http://127.0.0.1:{port}'",
                                                    "--max-failures 0 -> 2", "--cpus-per-trial 1.0 -> 0.5"]
    ran = [trial for trial in _trial_states(study) if before.get(trial["trial_id"]) != "TERMINATED"]  # restored or new
    assert len(ran) == TRIALS - list(before.values()).count("TERMINATED")
    assert all(trial["max_failures"] == 2 for trial in ran), [(t["trial_id"], t["max_failures"]) for t in ran]
    assert all(pickle.loads(bytes.fromhex(trial["placement_group_factory"])).required_resources == {"CPU": 0.5}
               for trial in ran)
    report = load_study(study)
    assert report.complete and len(report.trials) == TRIALS and (report.trials["status"] == "OK").all()


def _in_session(process: psutil.Process, sid: int) -> bool:
    """Ray's workers leave their parent's process group but keep the session the driver was started in."""
    try:
        return os.getsid(process.pid) == sid
    except (ProcessLookupError, PermissionError):
        return False


def _name(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline()[:3])
    except psutil.Error:
        return "?"


def _hand_study(tmp_path: Path, pid: int) -> Path:
    """A vae_lr folder as Tune leaves it mid-study: one trial finished, one running, one not created yet, and a
    stale trials.csv from an earlier interrupted invocation."""
    study = tmp_path / "vae_lr"
    for index, epochs in ((0, 2), (1, 1)):
        trial = study / f"train_vae_abc_0000{index}"
        trial.mkdir(parents=True)
        (trial / "params.json").write_text(json.dumps({"optim": {"lr": 10.0 ** -index}, "epochs": 2}))
        (trial / "result.json").write_text("".join(json.dumps({"epoch": e, "training_iteration": e,
                                                               "val/loss": 1.0 / e}) + "\n" for e in range(1, epochs + 1)))
    states = {"train_vae_abc_00000": "TERMINATED", "train_vae_abc_00001": "RUNNING", "train_vae_abc_00002": "PENDING"}
    (study / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": [
        [json.dumps({"trial_id": name[-9:], "relative_logdir": name, "status": status}), "{}"]
        for name, status in states.items()]}))
    pd.DataFrame([{"trial": "train_vae_abc_00000", "status": "INTERRUPTED", "epoch": 1}]).to_csv(study / "trials.csv")
    (study / "study.json").write_text(json.dumps({
        "name": "vae_lr", "task": "generation", "metric": "val/loss", "mode": "min", "state": "running",
        "invocations": [{"state": "interrupted"}, {"state": "running", "host": socket.gethostname(), "pid": pid}]}))
    return study


def test_analysis_of_a_running_study_says_so_and_ranks_only_finished_trials(tmp_path):
    study = load_study(_hand_study(tmp_path, os.getpid()))  # this process stands for the live driver
    assert study.state == "running" and not study.complete
    assert describe(study.state, study.trials).startswith(
        "INCOMPLETE: the study is still running; 2 of 3 trial(s) unfinished (not ranked")
    assert dict(zip(study.trials["trial"], study.trials["status"])) == {
        "train_vae_abc_00000": "OK", "train_vae_abc_00001": "RUNNING", "train_vae_abc_00002": "PENDING"}
    pending = study.trials.set_index("trial").loc["train_vae_abc_00002"]
    assert pending.filter(like="config/").isna().all()  # no invented config for a trial that never ran
    assert list(ranked(study)["rank"].fillna(0)) == [1, 0, 0]
    study.rankable = ("OK", "RUNNING")  # --include-unfinished
    assert ranked(study)["rank"].notna().sum() == 2

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = load_study(_hand_study(tmp_path / "killed", int(gone.stdout)))  # its driver no longer exists
    assert killed.state == "killed"
    assert list(killed.trials["status"]) == ["OK", "INTERRUPTED", "NOT_STARTED"]


def test_analysis_of_a_running_study_reads_a_trial_whose_params_are_still_being_written(tmp_path):
    """Tune creates a starting trial's params.json empty and fills it a moment later: the analysis of a running
    study lists that trial without a config instead of failing on the half-written file."""
    from analysis.load import trials_from_folders

    for name, params in (("train_vae_aaaaa_00000", json.dumps({"seed": 0, "optim": {"lr": 0.001}})),
                         ("train_vae_aaaaa_00001", "")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "params.json").write_text(params)
    table = trials_from_folders(tmp_path, "val/loss", "min", running=True)
    assert sorted(table["trial"]) == ["train_vae_aaaaa_00000", "train_vae_aaaaa_00001"]
    half_written = table.set_index("trial").loc["train_vae_aaaaa_00001"]
    assert pd.isna(half_written["config/optim/lr"])


def test_resume_gives_restored_and_newly_created_trials_the_new_retries_and_unplaced_ones_the_new_resources():
    """A resumed grid creates its remaining trials from the first run's pickled spec (max_failures 0): every
    unfinished trial gets the new --max-failures; only trials not placed yet get the new resources."""
    from ray.tune.execution.placement_groups import PlacementGroupFactory
    from ray.tune.experiment import Trial

    from studies.runner.tuner import ApplyOnResume

    def trial(status: str) -> Trial:
        made = Trial("train_vae", config={}, stub=True, max_failures=0,
                     placement_group_factory=PlacementGroupFactory([{"CPU": 1.0}]))
        made.create_placement_group_factory()  # as Tune's add_trial does
        made.set_status(status)
        return made

    pending, running, paused, done = trial("PENDING"), trial("RUNNING"), trial("PAUSED"), trial("TERMINATED")
    ApplyOnResume(cpus=0.5, gpus=0, max_failures=2).on_step_begin(0, [pending, running, paused, done])
    assert [t.max_failures for t in (pending, running, paused, done)] == [2, 2, 2, 0]
    resources = [t.placement_group_factory.required_resources for t in (pending, running, paused, done)]
    assert resources == [{"CPU": 0.5}, {"CPU": 1.0}, {"CPU": 0.5}, {"CPU": 1.0}]
