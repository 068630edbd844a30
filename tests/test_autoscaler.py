"""A real Ray autoscaler on this machine: Ray's fake multi-node provider starts worker nodes as local processes.

The head has no CPU for trials and no `ray up` file (HOME is a fresh folder), so only what Ray itself publishes
tells the study that an autoscaler runs. A --quick study joins with --address, its trials make the autoscaler
start CPU workers, they run there, and the idle workers go away. A GPU node type that the autoscaler tries and
fails to start (its object store is below Ray's minimum) is the cloud that never delivers: a GPU study waits for
it until --pending-timeout ends it with a clear error. Everything runs in sessions this test starts and stops.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_cluster import Started, answers, free_port, wait_until

from conftest import ROOT, study_command

pytestmark = pytest.mark.slow
STUDY, TRIALS = "vae_lr", 5
IDLE_MINUTES = 0.2  # workers idle this long are removed: seconds, not the default 5 minutes
# the live nodes, the head's id and whether the autoscaler has reported to GCS, once `until` holds or time runs out
STATE_SCRIPT = """
import json, sys, time, ray
from analysis.ray_internals import autoscaling_status
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
until, deadline = sys.argv[2], time.time() + float(sys.argv[3])
while True:
    alive = [node for node in ray.nodes() if node["Alive"]]
    head = [node["NodeID"] for node in alive if "node:__internal_head__" in node["Resources"]]
    status = json.loads(autoscaling_status() or "{}")
    state = {"head": head, "alive": [node["NodeID"] for node in alive], "autoscaler": "autoscaler_report" in status}
    if (state["autoscaler"] if until == "autoscaler" else len(alive) == len(head)) or time.time() > deadline:
        break
    time.sleep(1)
print("STATE " + json.dumps(state))
"""


def autoscaling_config(gcs_port: int) -> dict:
    """A cluster config for Ray's fake provider: every top-level key Ray's autoscaler reads must be present."""
    return {
        "cluster_name": "vt-fake", "max_workers": 3, "idle_timeout_minutes": IDLE_MINUTES, "upscaling_speed": 1.0,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{gcs_port}"},
        "auth": {"ssh_user": "ray"},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {"resources": {"CPU": 1, "object_store_memory": 100 * 2**20}, "node_config": {},
                           "min_workers": 0, "max_workers": 2},
            # Ray refuses an object store under 75 MB, so every launch of this type fails
            "gpu_worker": {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 2**20}, "node_config": {},
                           "min_workers": 0, "max_workers": 1}},
        **{key: [] for key in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
                               "setup_commands", "head_setup_commands", "worker_setup_commands",
                               "head_start_ray_commands", "worker_start_ray_commands")},
        "file_mounts": {}, "file_mounts_sync_continuously": False,
    }


def cluster_state(cluster: dict, until: str, timeout: float) -> dict:
    done = subprocess.run([sys.executable, "-c", STATE_SCRIPT, cluster["address"], until, str(timeout)],
                          env=cluster["env"], capture_output=True, text=True, timeout=timeout + 60)
    lines = [line for line in done.stdout.splitlines() if line.startswith("STATE ")]
    assert lines, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(lines[-1][len("STATE "):])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head with zero CPUs whose autoscaler may add two 1-CPU workers, stopped even when a test fails."""
    tmp = tmp_path_factory.mktemp("autoscaler")
    ray_tmp = Path(tempfile.mkdtemp(prefix="vt-as-"))  # short: Ray's socket paths must fit in 107 bytes
    (tmp / "home").mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(PYTHONPATH=str(ROOT), HOME=str(tmp / "home"), RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
               RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    started = Started(env, tmp)
    gcs_port = free_port()
    config = tmp / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(autoscaling_config(gcs_port)))
    try:
        head = started.start_node("head", [
            "--head", "--port", str(gcs_port), "--num-cpus", "0", "--num-gpus", "0", "--autoscaling-config",
            str(config), "--include-dashboard=false", "--temp-dir", str(ray_tmp), "--object-store-memory",
            str(100 * 2**20)])
        wait_until(lambda: answers(gcs_port), head, "the head node's GCS", started)
        info = {"address": f"127.0.0.1:{gcs_port}", "env": env, "dir": tmp, "started": started}
        state = cluster_state(info, "autoscaler", 60)  # the study must see the autoscaler's first status
        assert state["autoscaler"] and len(state["alive"]) == 1, f"{state}\n{started.log_tail('head')}"
        yield {**info, "head": state["head"][0]}
    finally:
        started.stop()
        shutil.move(ray_tmp, tmp / "ray")  # the nodes' and the monitor's logs, kept for a post-mortem
    assert started.leftovers() == {}


def run(cluster: dict, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(study_command(STUDY, "--quick", "--epochs", "1", "--address", cluster["address"],
                                        "--mlflow-uri", f"sqlite:///{cluster['dir'] / 'mlflow.db'}", *args),
                          cwd=cluster["dir"], env=cluster["env"], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def study(cluster):
    storage = cluster["dir"] / "results"
    done = run(cluster, "--storage", str(storage), "--cpus-per-trial", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for path in sorted((storage / STUDY).glob("*/result.json"))
            for line in path.read_text().splitlines() if line.strip()]
    return {"dir": storage / STUDY, "log": done.stderr, "rows": rows}


def test_the_study_waits_for_the_autoscaler_it_learnt_from_ray(study):
    assert "no live node of this Ray cluster can host a trial yet" in study["log"], study["log"][-3000:]
    assert "the autoscaler (its status in Ray's GCS)" in study["log"]


def test_trials_ran_on_workers_the_autoscaler_started(cluster, study):
    table = pd.read_csv(study["dir"] / "trials.csv")
    assert len(table) == TRIALS and (table["status"] == "OK").all(), table
    used = {row["node_id"] for row in study["rows"]}
    assert len(study["rows"]) == TRIALS and used and cluster["head"] not in used, (cluster["head"], used)
    print(f"{TRIALS} trials ran on {len(used)} worker node(s) the autoscaler started")


def test_idle_workers_are_removed(cluster, study):
    state = cluster_state(cluster, "workers gone", 90)
    assert state["alive"] == [cluster["head"]], state


def test_trials_the_autoscaler_never_delivers_for_end_at_the_pending_timeout(cluster, study):
    begun = time.monotonic()
    done = run(cluster, "--storage", str(cluster["dir"] / "gpu"), "--gpus-per-trial", "1",
               "--pending-timeout", "8", timeout=180)
    took = time.monotonic() - begun
    assert done.returncode == 1, done.stdout[-2000:]  # a failure of the cluster, not of the command line
    assert "error: " in done.stderr and "still PENDING after --pending-timeout 8 s" in done.stderr, \
        done.stderr[-3000:]
    assert "--cpus-per-trial 1 --gpus-per-trial 1 ask for CPU 1, GPU 1 per trial" in done.stderr
    assert "the autoscaler (its status in Ray's GCS)" in done.stderr
    assert "gpu_worker" in done.stderr  # it did try to launch the node type that never arrives
    error = next(line for line in done.stderr.splitlines() if line.startswith("error: "))
    print(f"GPU study ended after {took:.0f} s (timeout 8 s, with the driver's start): {error}")
