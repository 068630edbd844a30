"""The resource check's three answers (ok / wait for the autoscaler / impossible) and the pending timeout, on
plain data shaped as Ray 2.60 publishes it (the monitor status below was read from a fake multi-node cluster's GCS,
trimmed to the keys the check reads). The same path end to end: tests/test_autoscaler.py."""
from __future__ import annotations

import json

import pytest
from ray.core.generated import autoscaler_pb2

from studies.runner import autoscaling, preflight
from analysis.ray_internals import node_groups

NOW = 1796109984.6
# `__autoscaling_status` as the v1 monitor wrote it while a {"CPU": 3} task waited on a cluster of 1-CPU workers
MONITOR = {
    "time": NOW - 2, "monitor_pid": 5561,
    "autoscaler_report": {"active_nodes": {"ray.head.default": 1, "cpu_worker": 1}, "pending_nodes": [],
                          "pending_launches": {"cpu_worker": 1}, "failed_nodes": [["192.0.2.9", "gpu_worker"]],
                          "legacy": True},
    "load_metrics_report": {"resource_demand": [[{"CPU": 3.0}, 1]], "pg_demand": [], "request_demand": []},
}
HEAD = {"Alive": True, "Resources": {"memory": 2.4e10, "node:__internal_head__": 1.0, "node:192.0.2.2": 1.0}}
CPU_WORKER = {"Alive": True, "Resources": {"CPU": 1.0, "memory": 1.7e10, "node:192.0.2.2": 1.0}}
DEAD_GPU = {"Alive": False, "Resources": {"CPU": 4.0, "GPU": 1.0}}


@pytest.fixture(autouse=True)
def no_bootstrap_file(tmp_path, monkeypatch):
    """No `ray up` config unless a test writes one: the developer's own home must not change the answers."""
    monkeypatch.setenv("HOME", str(tmp_path))


def monitor(**changes) -> str:
    return json.dumps({**MONITOR, **changes})


def test_a_live_node_that_fits_needs_no_autoscaler():
    assert preflight.check_resources([HEAD, CPU_WORKER], 1, 0, None) is None


def test_no_autoscaler_and_no_node_that_fits_fails_at_once_naming_the_flag():
    with pytest.raises(preflight.ResourceError, match=r"--cpus-per-trial 1 asks for 1 CPU\(s\).*more than 0 .*PENDING"):
        preflight.check_resources([HEAD, DEAD_GPU], 1, 0, None)  # the dead node's CPUs count for nothing


def test_a_running_v1_monitor_lets_trials_wait_and_says_what_is_pending():
    scaler = autoscaling.learn(monitor(), None, now=NOW)
    assert scaler.node_types is None and scaler.launching == {"cpu_worker": 1}
    note = preflight.check_resources([HEAD], 1, 0, scaler, timeout=900)
    assert "no live node" in note and "it has no live node" not in note
    assert "its status in Ray's GCS" in note and "does not publish which node types" in note
    assert "launching 1 x cpu_worker" in note and "1 x {CPU 3}" in note and "gpu_worker (192.0.2.9)" in note
    assert note.endswith("up to --pending-timeout 900 s.")


def test_a_stale_missing_or_read_only_monitor_status_is_no_autoscaler():
    assert autoscaling.learn(monitor(time=NOW - autoscaling.STALE_S - 1), None, now=NOW) is None
    assert autoscaling.learn(None, None, now=NOW) is None
    assert autoscaling.learn(monitor(autoscaler_report=None), None, now=NOW) is None  # before its first update
    # what `ray.init()`'s own head writes: Ray's read-only monitor, which only mirrors the live nodes
    read_only = {"active_nodes": {"node_63a0f12b8bcd30b88127b04fd891e7e5cc04937aa042fbcfbeb4caae": 1},
                 "pending_launches": {}, "failed_nodes": [], "node_availability_summary": {"node_availabilities": {}}}
    assert autoscaling.learn(monitor(autoscaler_report=read_only), None, now=NOW) is None
    with pytest.raises(preflight.ResourceError):
        preflight.check_resources([HEAD], 1, 0, autoscaling.learn(monitor(time=0), None, now=NOW))


def v2_config() -> autoscaler_pb2.ClusterConfig:
    """Autoscaler v2's report as Ray's own protobuf: the head group, a GPU group, one that may not grow."""
    config = autoscaler_pb2.ClusterConfig()
    for name, resources, max_count in (("headgroup", {"CPU": 4}, 1), ("gpu-group", {"CPU": 8, "GPU": 1}, -1),
                                       ("frozen", {"CPU": 64}, 0)):
        group = config.node_group_configs.add(name=name, max_count=max_count)
        group.resources.update(resources)
    return config


def test_v2_node_groups_decide_between_waiting_and_impossible():
    scaler = autoscaling.learn(None, node_groups(v2_config()), now=NOW)
    assert scaler.node_types == {"headgroup": {"CPU": 4}, "gpu-group": {"CPU": 8, "GPU": 1}}  # frozen: max 0
    assert "gpu-group (CPU 8, GPU 1)" in preflight.check_resources([HEAD], 8, 1, scaler)
    with pytest.raises(preflight.ResourceError, match=r"--gpus-per-trial 2 .*nor any node type its autoscaler can add"):
        preflight.check_resources([HEAD], 1, 2, scaler)
    with pytest.raises(preflight.ResourceError, match=r"--cpus-per-trial 64 "):  # only the frozen group had 64
        preflight.check_resources([HEAD], 64, 0, scaler)


def test_a_request_each_node_meets_half_of_is_impossible_too():
    scaler = autoscaling.learn(None, node_groups(v2_config()), now=NOW)
    with pytest.raises(preflight.ResourceError, match=r"no single node .* has both"):
        preflight.check_resources([{"Alive": True, "Resources": {"CPU": 16}}], 16, 1, scaler)


def test_node_types_beat_the_monitors_silence_and_the_file_is_a_source(tmp_path):
    (tmp_path / "ray_bootstrap_config.yaml").write_text(
        "available_node_types:\n  head: {resources: {CPU: 2}, max_workers: 0}\n"
        "  gpu: {resources: {CPU: 4, GPU: 1}, max_workers: 2}\n")
    scaler = autoscaling.learn(monitor(), None, now=NOW)
    assert scaler.sources == ("its status in Ray's GCS", autoscaling.AUTOSCALER_CONFIG)
    assert scaler.node_types == {"gpu": {"CPU": 4, "GPU": 1}}  # head: max_workers 0, nothing to add
    assert "gpu (CPU 4, GPU 1)" in preflight.check_resources([HEAD], 2, 1, scaler)
    with pytest.raises(preflight.ResourceError, match="--cpus-per-trial 5 "):
        preflight.check_resources([HEAD], 5, 1, scaler)
    assert preflight.check_resources([HEAD], 4, 1) is not None  # without a scaler: the file alone, as before


def test_pending_clock_counts_only_time_with_nothing_running():
    clock = preflight.PendingClock(10)
    assert clock.expired(["PENDING", "PENDING"], 0) == 0
    assert clock.expired(["PENDING", "PENDING"], 9.9) == 0
    assert clock.expired(["PENDING", "RUNNING"], 11) == 0  # a trial runs: queueing behind it is no hang
    assert clock.expired(["PENDING", "TERMINATED"], 12) == 0  # the wait starts again here
    assert clock.expired(["PENDING", "TERMINATED"], 21.9) == 0
    assert clock.expired(["PENDING", "TERMINATED"], 22) == 1
    assert preflight.PendingClock(0).expired(["PENDING"], 1e9) == 0  # --pending-timeout 0: forever


def test_pending_clock_says_what_it_waits_for_once_a_minute():
    clock = preflight.PendingClock(900, note_every=60)
    clock.expired(["PENDING"], 100)
    assert [clock.note_due(t) for t in (100, 159, 160, 161, 230)] == [False, False, True, False, True]
    clock.expired(["RUNNING"], 231)
    assert not clock.note_due(290)


def test_pending_timeout_message_names_request_and_offer():
    scaler = autoscaling.learn(monitor(), None, now=NOW)
    text = preflight.pending_timeout_message(3, 1, 1, 15, [HEAD, CPU_WORKER, DEAD_GPU], scaler)
    assert text.startswith("3 trial(s) still PENDING after --pending-timeout 15 s")
    assert "--cpus-per-trial 1 --gpus-per-trial 1 ask for CPU 1, GPU 1 per trial" in text
    assert "its 2 live node(s) have CPU 1 / no CPU or GPU" in text and "launching 1 x cpu_worker" in text
    alone = preflight.pending_timeout_message(1, 1, 0, 15, [], None)
    assert "it has no live node" in alone and "no autoscaler runs" in alone
