"""`ray job submit --working-dir .` exactly as the README shows, against a head started from this project's own
install (`ray[default]`: the dashboard that serves jobs), on free ports, with Ray's token authentication.

The head gets no PYTHONPATH: the job's code must come from the uploaded working directory, not from this checkout.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_cluster import BIN, Started, answers, free_port, wait_until

from conftest import ROOT

pytestmark = pytest.mark.slow
STUDY, TRIALS = "vae_lr", 5


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jobs")
    ray_tmp = Path(tempfile.mkdtemp(prefix="vt-job-"))  # short: Ray's socket paths must fit in 107 bytes
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_") and key != "PYTHONPATH"}
    # as in a shell with the project's venv activated: `python` and `ray` are the venv's
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32),
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    started = Started(env, tmp)
    gcs_port, dashboard_port = free_port(), free_port()
    try:
        proc = started.start_node("head", [
            "--head", "--port", str(gcs_port), "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard=true",
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--ray-client-server-port",
            str(free_port()), "--temp-dir", str(ray_tmp), "--object-store-memory", str(100 * 2**20)])
        # its HTTP API answers 401 without the token: an open port is the sign it serves
        wait_until(lambda: answers(dashboard_port), proc, "the dashboard", started, timeout=120)
        yield {"address": f"http://127.0.0.1:{dashboard_port}", "env": env, "dir": tmp}
    finally:
        started.stop()
        shutil.move(ray_tmp, tmp / "ray")
    assert started.leftovers() == {}


def submit(head: dict, *entrypoint: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """From the repository root, as a user would: the README's command line."""
    return subprocess.run([str(BIN / "ray"), "job", "submit", "--address", head["address"], "--working-dir", ".",
                           "--", *entrypoint], cwd=ROOT, env=head["env"], capture_output=True, text=True,
                          timeout=timeout)


def test_the_job_runs_the_uploaded_code(head):
    # the package alone (no torch or Ray Tune to import): which copy of the code Python finds is the point
    done = submit(head, "python", "-c", "import studies; print('RUNNER', studies.__file__)", timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    path = next(line.split(" ", 1)[1] for line in done.stdout.splitlines() if line.startswith("RUNNER "))
    assert "runtime_resources" in path and not path.startswith(str(ROOT)), path  # the job's copy of the code


def test_a_quick_study_submitted_as_a_job(head):
    storage, uri = head["dir"] / "shared", f"sqlite:///{head['dir'] / 'mlflow.db'}"
    done = submit(head, "python", f"studies/{STUDY}.py", "--address", "auto", "--quick", "--epochs", "1",
                  "--storage", str(storage), "--mlflow-uri", uri)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout)  # the CLI colours its own lines
    assert re.search(r"Job 'raysubmit_\w+' succeeded", log), log[-3000:]
    # the driver's last words, streamed back by `ray job submit`: the trials table, the best config, the report
    table = log[log.index(f"=== {STUDY}: {TRIALS} trial(s), sorted by val/loss ==="):log.index("succeeded")]
    assert len([line for line in table.splitlines() if " OK " in line]) == TRIALS, table
    assert "best config:" in table and "report:    python -m analysis" in table
    study_dir = storage / STUDY
    assert (study_dir / "trials.csv").is_file() and (study_dir / "study.json").is_file()
    assert json.loads((study_dir / "study.json").read_text())["mlflow_uri"] == uri
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(STUDY).experiment_id])
    trials = [run for run in runs if "vision_tune.trial_id" in run.data.tags]  # the study's parent run aside
    assert len(trials) == TRIALS and {run.info.status for run in runs} == {"FINISHED"}
