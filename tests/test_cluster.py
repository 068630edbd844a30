"""A real two-node Ray cluster on this machine, an MLflow server over HTTP, and a --quick study joined to both.

The nodes are two ``ray start --block`` processes with one CPU each and a custom resource naming them,
so a study's two concurrent trials must land on different nodes. The storage folder plays the part of the
cluster's shared file system (both nodes see it). Everything the test starts runs in its own session and
is stopped by session id, never with ``ray stop``, which would take down every Ray on the machine.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT, study_command
from studies.runner import preflight

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent  # the venv's `ray` and `mlflow`, matching the Ray the study imports
STUDY, TRIALS, EPOCHS = "vae_lr", 5, 2
REGISTERED = "vae-lr-on-the-cluster"
# the nodes' ids and resources as the cluster itself reports them, printed as one JSON line
NODES_SCRIPT = """
import json, sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
deadline = time.time() + 60
while True:
    nodes = [node for node in ray.nodes() if node["Alive"]]
    if len(nodes) >= 2 or time.time() > deadline:
        break
    time.sleep(0.5)
print("NODES " + json.dumps({node["NodeID"]: node["Resources"] for node in nodes}))
"""


_GIVEN: set[int] = set()  # the kernel hands a just-closed port out again: never give one twice in a run


def free_port() -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def node_ports() -> list[str]:
    """Every per-node port Ray would otherwise take from fixed defaults, which two nodes on one host share."""
    flags = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
    return [arg for flag in flags for arg in (flag, str(free_port()))]


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid``: Ray's workers leave their parent's process group but keep its session."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state ppid pgrp session ...
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def program(pid: int) -> str:
    try:
        return Path(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()).name
    except OSError:
        return ""


def carrying(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker``: every descendant inherits it, whatever its session."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
        except OSError:
            continue
    return pids


class Started:
    """The processes this test started, each the leader of its own session, stopped in reverse order."""

    def __init__(self, env: dict, log_dir: Path) -> None:
        self.env, self.log_dir, self.procs = env, log_dir, []

    def popen(self, name: str, cmd: list[str], **extra_env: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, env={**self.env, **extra_env}, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        proc.name = name
        self.procs.append(proc)
        return proc

    def start_node(self, name: str, args: list[str], timeout: float = 120) -> subprocess.Popen:
        """``ray start ARGS --block`` (and ports of its own), returned once its node is up. Ray gives a node 30 s
        to register with the GCS (fixed in Ray's private node module), which a loaded 2-core machine can miss: such a
        start is retried once, with fresh ports; any other failure is the test's."""
        for attempt in (1, 2):
            label = name if attempt == 1 else f"{name}-retry"
            proc = self.popen(label, [str(BIN / "ray"), "start", "--block", *args, *node_ports()])
            deadline = time.time() + timeout
            while "Ray runtime started." not in (self.log_dir / f"{label}.log").read_text():
                if proc.poll() is not None:
                    break
                assert time.time() < deadline, f"{label}: not up after {timeout:.0f} s:\n{self.log_tail(label)}"
                time.sleep(0.3)
            else:
                return proc
            if attempt == 1 and "timed out during startup" in self.log_tail(label, 20_000):
                continue
            raise AssertionError(f"{label} exited with {proc.returncode}:\n{self.log_tail(label)}")
        raise AssertionError("unreachable")

    def log_tail(self, name: str, chars: int = 3000) -> str:
        return (self.log_dir / f"{name}.log").read_text()[-chars:]

    def stop(self) -> None:
        """SIGTERM to the leader (``ray start --block`` then shuts its node down), SIGKILL to whatever is left."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    pass
            for _ in range(50):
                left = session_members(proc.pid)
                if not left:
                    break
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)
            proc.wait(timeout=10)

    def leftovers(self) -> dict[str, list[int]]:
        left = {proc.name: pids for proc in self.procs if (pids := session_members(proc.pid))}
        marker = f"RAY_AUTH_TOKEN={self.env['RAY_AUTH_TOKEN']}"  # unique to this test run
        if pids := carrying(marker):
            left["anything with this run's token"] = pids
        return left


def wait_until(ready, proc: subprocess.Popen, what: str, started: Started, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"{what} exited with {proc.returncode}:\n{started.log_tail(proc.name)}"
        assert time.time() < deadline, f"{what} not ready after {timeout:.0f} s:\n{started.log_tail(proc.name)}"
        time.sleep(0.3)


def answers(port: int, path: str | None = None) -> bool:
    try:
        if path is None:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_gpu_trials_wait_for_the_autoscaler_on_a_launcher_cluster(tmp_path, monkeypatch):
    """A fresh `ray up` cluster has only its CPU head: --gpus-per-trial 1 must wait for a GPU worker, not fail."""
    head_only = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 0.0}}]
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(preflight.ResourceError, match="--gpus-per-trial 1 "):
        preflight.check_resources(head_only, 1, 1)  # no launcher config: nothing will ever add a GPU
    shutil.copy(ROOT / "cluster.yaml", tmp_path / "ray_bootstrap_config.yaml")  # as `ray up` leaves it on the head
    preflight.check_resources(head_only, 4, 1)  # g5.xlarge
    preflight.check_resources(head_only, 8, 4)  # g5.12xlarge
    with pytest.raises(preflight.ResourceError, match="nor any node type its autoscaler can add"):
        preflight.check_resources(head_only, 1, 8)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head and worker Ray nodes plus an MLflow server, torn down even when setting up or a test fails."""
    tmp = tmp_path_factory.mktemp("cluster")
    ray_tmp = Path(tempfile.mkdtemp(prefix="vt-ray-"))  # short: Ray's socket paths must fit in 107 bytes
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0",
               # an explicit --address only authenticates when told to: the cluster's own token, on every process
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               # without this, SIGTERM makes `ray start --block` wait 30 s for the node to drain
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    started = Started(env, tmp)
    gcs_port, mlflow_port = free_port(), free_port()
    common = ["--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", str(100 * 2**20)]
    try:
        mlflow = started.popen("mlflow", [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination", str(tmp / "artifacts")],
            # tracking needs no job runner: one process less to start, and no huey store left in /dev/shm
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        head = started.start_node("head", [
            "--head", "--port", str(gcs_port), "--resources", '{"head_node": 1}', "--include-dashboard=false",
            "--dashboard-port", str(free_port()), "--temp-dir", str(ray_tmp / "h"), *common])
        wait_until(lambda: answers(gcs_port), head, "the head node's GCS", started)
        address = f"127.0.0.1:{gcs_port}"
        worker = started.start_node("worker", [
            "--address", address, "--resources", '{"worker_node": 1}', "--temp-dir", str(ray_tmp / "w"), *common])
        found = subprocess.run([sys.executable, "-c", NODES_SCRIPT, address], env=env, capture_output=True,
                               text=True, timeout=120)
        lines = [line for line in found.stdout.splitlines() if line.startswith("NODES ")]
        assert lines, found.stdout[-2000:] + found.stderr[-2000:] + started.log_tail("worker")
        nodes = json.loads(lines[-1][len("NODES "):])
        assert len(nodes) == 2, f"{nodes}\n{started.log_tail('worker')}"
        by_role = {role: node_id for node_id, resources in nodes.items()
                   for role in ("head_node", "worker_node") if role in resources}
        assert worker.poll() is None and set(by_role) == {"head_node", "worker_node"}, nodes
        wait_until(lambda: answers(mlflow_port, "/health"), mlflow, "the MLflow server", started)
        yield {"address": address, "nodes": by_role, "env": env, "dir": tmp, "started": started,
               "mlflow_uri": f"http://127.0.0.1:{mlflow_port}"}
    finally:
        started.stop()
        shutil.move(ray_tmp, tmp / "ray")  # the nodes' logs, kept with the test's other files for a post-mortem
    assert started.leftovers() == {}  # reached on every normal teardown, also after failed tests


@pytest.fixture(scope="module")
def study(cluster):
    """The --quick study, run as a user would, joined to the cluster with --address.

    Its own 20 steps an epoch, not fewer: the first trial worker to finish importing torch must not be able
    to run all five trials alone before the other node's worker is ready (with reuse_actors it would).
    """
    storage = cluster["dir"] / "shared"
    args = ["--quick", "--address", cluster["address"], "--storage", str(storage), "--mlflow-uri",
            cluster["mlflow_uri"], "--cpus-per-trial", "1", "--register-model", REGISTERED]
    done = subprocess.run(study_command(STUDY, *args), cwd=cluster["dir"], env=cluster["env"], capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    study_dir = storage / STUDY
    results = {}
    for path in sorted(study_dir.glob("*/result.json")):
        results[path.parent.name] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {"dir": study_dir, "results": results, "out": done.stdout}


def test_trials_ran_on_both_nodes(cluster, study):
    assert len(study["results"]) == TRIALS
    placed = {trial: {row["node_id"] for row in rows} for trial, rows in study["results"].items()}
    assert all(len(nodes) == 1 for nodes in placed.values()), placed  # one trial, one node
    used = set.union(*placed.values())
    timeline = sorted((rows[0]["timestamp"], trial, rows[0]["node_id"][:8], rows[0]["pid"])
                      for trial, rows in study["results"].items())
    assert used == set(cluster["nodes"].values()), f"cluster nodes {cluster['nodes']}, trials (start, node, pid):\n" + \
        "\n".join(map(str, timeline))


def test_all_results_landed_in_the_shared_storage(study):
    study_dir = study["dir"]
    assert (study_dir / "study.json").is_file()
    table = pd.read_csv(study_dir / "trials.csv")
    assert len(table) == TRIALS and (table["status"] == "OK").all()
    for trial, rows in study["results"].items():
        assert [row["epoch"] for row in rows] == list(range(1, EPOCHS + 1)), trial
        checkpoints = sorted((study_dir / trial).glob("checkpoint_*/state.pt"))
        assert checkpoints, f"{trial} has no checkpoint in {study_dir}"


def test_mlflow_over_http_has_every_run(cluster, study):
    client = MlflowClient(tracking_uri=cluster["mlflow_uri"])
    experiment = client.get_experiment_by_name(STUDY)
    assert experiment is not None
    runs = [run for run in client.search_runs([experiment.experiment_id])
            if "vision_tune.study_run" not in run.data.tags]  # the study's parent run aside
    trial_ids = {rows[-1]["trial_id"] for rows in study["results"].values()}
    assert {run.data.tags["vision_tune.trial_id"] for run in runs} == trial_ids and len(runs) == TRIALS
    for run in runs:
        assert run.info.status == "FINISHED"
        assert "optim/lr" in run.data.params and run.data.params["model"] == "conv_vae"
        history = client.get_metric_history(run.info.run_id, "val/loss")
        assert [metric.step for metric in history] == list(range(1, EPOCHS + 1))
        assert "artifacts/meta.json" in {a.path for a in client.list_artifacts(run.info.run_id, "artifacts")}
    # artifacts went through the server into its own destination, not into a path the trials guessed
    assert len(list((cluster["dir"] / "artifacts").rglob("meta.json"))) == TRIALS


def test_mlflow_server_holds_the_parent_named_trials_inputs_and_the_registered_model(cluster, study):
    """The tracking server's side of test_tracking.py's sqlite checks, on this module's study."""
    import mlflow.pytorch
    import torch

    uri = cluster["mlflow_uri"]
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(STUDY)
    runs = client.search_runs([experiment.experiment_id])
    parents = [run for run in runs if run.data.tags.get("vision_tune.study_run") == "true"]
    trials = [run for run in runs if run not in parents]
    assert len(parents) == 1 and len(trials) == TRIALS and parents[0].info.run_name == STUDY
    assert {run.data.tags["mlflow.parentRunId"] for run in trials} == {parents[0].info.run_id}
    assert sorted(run.info.run_name for run in trials) == ["A lr=0.005", "B lr=0.001", "C lr=0.0005", "D lr=0.0001",
                                                            "E lr=5e-05"]
    for run in trials:
        contexts = {tag.value for d in run.inputs.dataset_inputs for tag in d.tags}
        names = {d.dataset.name for d in run.inputs.dataset_inputs}
        assert contexts == {"training", "validation"} and names == {"mnist5k"}
    best = parents[0].data.tags["vision_tune.best_run"]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # runs:/ URIs resolve through the global tracking URI
    try:
        model = mlflow.pytorch.load_model(f"runs:/{best}/model", map_location="cpu")  # through the server's artifacts
    finally:
        mlflow.set_tracking_uri(previous)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 1, 28, 28)
    [version] = client.search_model_versions(f"name = '{REGISTERED}'")
    assert version.run_id == best and f"registered: model '{REGISTERED}' version {version.version}" in study["out"]
    # the printed runs view names an experiment the server knows, and the server serves the UI
    url = f"{uri}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    assert f"MLflow UI: {url}" in study["out"]
    with urllib.request.urlopen(f"{uri}/ajax-api/2.0/mlflow/experiments/get?experiment_id={experiment.experiment_id}",
                                timeout=30) as response:
        assert json.loads(response.read())["experiment"]["name"] == STUDY
    with urllib.request.urlopen(uri, timeout=30) as response:
        assert response.status == 200 and b"<html" in response.read().lower()


def test_teardown_stops_every_process_it_started(cluster):
    """Runs last (file order); independent of the study, so it also checks the teardown when the study failed."""
    started = cluster["started"]
    programs = {proc.name: {program(pid) for pid in session_members(proc.pid)} for proc in started.procs}
    assert {"gcs_server", "raylet"} <= programs["head"] and "raylet" in programs["worker"], programs
    started.stop()
    assert started.leftovers() == {}
