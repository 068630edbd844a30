"""A cluster whose worker shares no disk with the driver: results in S3, trials pinned to the worker, pretrained
weights from the driver, a worker killed mid-study and started again.

The worker node runs in its own mount namespace (``unshare -m``) where the driver's folder (its data, its weights
cache, its MLflow store) is an empty folder, with its own HOME, TORCH_HOME, temporary folder and working directory.
Trials ask for the worker's custom resource (``--resources-per-trial``), so they can only run there. Everything
this module starts is stopped by session id (``ray stop`` would stop every Ray on the machine).
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, study_command
from servers import s3  # noqa: F401 (module-scoped fixture)
from test_cluster import BIN, NODES_SCRIPT, Started, answers, free_port, node_ports, session_members, wait_until

pytestmark = pytest.mark.slow
WEIGHTS = "resnet50-11ad3fa6.pth"  # where torchvision looks for ResNet50_Weights.IMAGENET1K_V2
STUDY = "seg_class_weights"  # four class weightings of the pretrained ResNet50/U-Net


def isolated(cmd: list[str], hidden: list[Path], empty: Path) -> list[str]:
    """``cmd`` in a mount namespace where each ``hidden`` folder is an empty one of its own."""
    binds = []
    for index, folder in enumerate(hidden):
        (empty / str(index)).mkdir(parents=True, exist_ok=True)
        binds.append(f"mount --bind {empty / str(index)} {folder}")
    return ["unshare", "-m", "--propagation", "private", "bash", "-c",
            " && ".join([*binds, "exec " + " ".join(f"'{part}'" for part in cmd)])]


def start_worker(started: Started, name: str, address: str, node: dict) -> subprocess.Popen:
    cmd = [str(BIN / "ray"), "start", "--block", "--address", address, "--num-cpus", "2", "--num-gpus", "0",
           "--resources", '{"worker": 2}', "--object-store-memory", str(400 * 2**20), "--temp-dir", node["ray_tmp"],
           *node_ports()]
    proc = started.popen(name, isolated(cmd, node["hidden"], node["empty"]), **node["env"])
    deadline = time.time() + 150
    while "Ray runtime started." not in (started.log_dir / f"{name}.log").read_text():
        assert proc.poll() is None, f"{name} exited with {proc.returncode}:\n{started.log_tail(name)}"
        assert time.time() < deadline, f"{name}: not up:\n{started.log_tail(name)}"
        time.sleep(0.3)
    return proc


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL every process of the node's session: the node dies as a machine would, the head lives on."""
    for pid in session_members(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def isolated_cluster(s3, tmp_path_factory):
    import torch
    from torchvision.models import resnet50

    driver = tmp_path_factory.mktemp("driver")  # the driver's own disk: data, weights cache, MLflow store
    worker = tmp_path_factory.mktemp("worker")
    ray_tmp = Path(tempfile.mkdtemp(prefix="vt-iso-"))  # short: Ray's socket paths must fit in 107 bytes
    weights = driver / "torch" / "hub" / "checkpoints" / WEIGHTS
    weights.parent.mkdir(parents=True)
    torch.manual_seed(0)  # not ImageNet's numbers (nothing is downloaded here), but its keys and shapes
    torch.save(resnet50().state_dict(), weights)
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    # the worker node's own environment: no S3 settings (the study forwards them), its own HOME and caches
    node_env = {key: value for key, value in env.items() if not key.startswith("AWS_")}
    node_env.update(HOME=str(worker / "home"), TORCH_HOME=str(worker / "torch"), TMPDIR=str(worker / "tmp"),
                    XDG_CACHE_HOME=str(worker / "cache"))
    for folder in ("home", "torch", "tmp", "cache"):
        (worker / folder).mkdir()
    node = {"env": node_env, "ray_tmp": str(ray_tmp / "w"), "empty": worker / "empty",
            "hidden": [driver, Path.home() / ".cache" / "vision-tune"]}
    Path.home().joinpath(".cache", "vision-tune").mkdir(parents=True, exist_ok=True)
    started = Started(env, tmp_path_factory.mktemp("logs"))
    gcs_port = free_port()
    try:
        head = started.start_node("head", [
            "--head", "--port", str(gcs_port), "--num-cpus", "1", "--num-gpus", "0", "--include-dashboard=false",
            "--dashboard-port", str(free_port()), "--temp-dir", str(ray_tmp / "h"),
            "--object-store-memory", str(400 * 2**20)])
        wait_until(lambda: answers(gcs_port), head, "the head node's GCS", started)
        address = f"127.0.0.1:{gcs_port}"
        worker_proc = start_worker(started, "worker", address, node)
        found = subprocess.run([sys.executable, "-c", NODES_SCRIPT, address], env=env, capture_output=True,
                               text=True, timeout=120)
        nodes = json.loads([line for line in found.stdout.splitlines() if line.startswith("NODES ")][-1][6:])
        head_id = next(node_id for node_id, resources in nodes.items() if "worker" not in resources)
        yield {"address": address, "env": {**env, **s3.env, "TORCH_HOME": str(driver / "torch")}, "driver": driver,
               "worker": worker, "node": node, "started": started, "worker_proc": worker_proc,
               "head_id": head_id, "weights": weights}
    finally:
        started.stop()
    assert started.leftovers() == {}


def bucket_epochs(s3, prefix: str) -> dict[str, list[dict]]:
    rows = {}
    for key in s3.keys("isolated", prefix):
        if key.endswith("/result.json"):
            body = s3.client().get_object(Bucket="isolated", Key=key)["Body"].read().decode()
            rows[key.split("/")[-2]] = [json.loads(line) for line in body.splitlines() if line.strip()]
    return rows


def test_trials_on_a_worker_without_the_drivers_disk_survive_its_death(s3, isolated_cluster):
    cluster = isolated_cluster
    s3.make_bucket("isolated")
    args = ["--address", cluster["address"], "--resources-per-trial", '{"worker": 1}', "--dataset", "shapes",
            "--image-size", "32", "--batch-size", "4", "--epochs", "3", "--steps-per-epoch", "3",
            "--data-root", str(cluster["driver"] / "data"), "--checkpoint-every", "1", "--max-failures", "3",
            "--storage", "s3://isolated/vt", "--mlflow-uri", f"sqlite:///{cluster['driver'] / 'mlflow.db'}"]
    driver = subprocess.Popen(study_command(STUDY, *args), cwd=cluster["driver"], env=cluster["env"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and driver.poll() is None:  # a trial has a checkpoint in S3, the study goes on
            rows = bucket_epochs(s3, f"vt/{STUDY}/")
            if any(r and 1 <= r[-1]["epoch"] < 3 for r in rows.values()):  # a trial between two checkpoints
                break
            time.sleep(0.5)
        assert driver.poll() is None, "the study ended before the worker could be killed"
        kill_session(cluster["worker_proc"])
        time.sleep(3)
        cluster["worker_proc"] = start_worker(cluster["started"], "worker-again", cluster["address"], cluster["node"])
        out, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.communicate()
    assert driver.returncode == 0, out[-5000:]
    rows = bucket_epochs(s3, f"vt/{STUDY}/")
    assert len(rows) == 4
    for trial, reports in rows.items():
        assert sorted({r["epoch"] for r in reports}) == [1, 2, 3], (trial, [r["epoch"] for r in reports])
        assert cluster["head_id"] not in {r["node_id"] for r in reports}, trial  # the worker (old or new) only
    moved = {trial: reports for trial, reports in rows.items() if len({r["node_id"] for r in reports}) > 1}
    assert moved, "no trial was running on the killed worker"
    for trial, reports in moved.items():  # retried from its last checkpoint in S3, not from the start
        before = [r for r in reports if r["node_id"] == reports[0]["node_id"]]
        after = [r for r in reports if r["node_id"] != reports[0]["node_id"]]
        assert after[0]["epoch"] == before[-1]["checkpoint_epoch"] + 1 > 1, (trial, [r["epoch"] for r in reports])
    # the weights reached the worker's own cache, byte for byte, from the driver (no download is possible here)
    copied = cluster["worker"] / "torch" / "hub" / "checkpoints" / WEIGHTS
    assert hashlib.sha256(copied.read_bytes()).hexdigest() == hashlib.sha256(cluster["weights"].read_bytes()).hexdigest()
    # the trials wrote nothing into the driver's folders: its data folder holds only what its own pre-flight built
    assert not list((cluster["driver"]).glob("**/checkpoint_*"))
