"""Everything vision-tune takes from Ray that Ray does not promise to keep: private modules, Trial attributes,
Tune's file formats and its signal handling. One function or constant each, so that an upgrade breaks here, in
one file, and ``tests/test_internals.py`` names the symbol that moved. Ray is imported inside the functions: the
analysis reads snapshots without starting (or importing) Ray.

Public APIs were checked first (Ray 2.60); none exists for what is here. README, "What we rely on", lists them.
"""
from __future__ import annotations

import json
import signal

# Tune's experiment snapshot, ``experiment_state-<time>.json`` in the study folder: what ``Tuner.restore`` resumes
# from, so it is the truth about which trials are done (after Ctrl-C Tune saves it with the running trials as
# RUNNING, then marks them TERMINATED in memory: the ResultGrid it returns calls every trial terminated).
SNAPSHOT_GLOB = "experiment_state-*.json"
# Tune's fit() stops the trials and saves the snapshot on this signal (and on SIGINT unless the variable is set)
TUNE_STOP_SIGNAL = getattr(signal, "SIGUSR1", None)
TUNE_SIGINT_VARIABLE = "TUNE_DISABLE_SIGINT_HANDLER"
# the GCS key the v1 autoscaler monitor writes its status under (ray._private.ray_constants)
AUTOSCALING_STATUS_KEY = "__autoscaling_status"


def parse_snapshot(text: str) -> dict[str, str]:
    """Trial folder name (``relative_logdir``) -> Tune status (PENDING, RUNNING, PAUSED, TERMINATED, ERROR)."""
    statuses = {}
    for entry in json.loads(text).get("trial_data", []):
        state = json.loads(entry[0]) if isinstance(entry, (list, tuple)) else entry
        if isinstance(state, str):
            state = json.loads(state)
        statuses[state.get("relative_logdir") or state.get("trial_id")] = state.get("status", "")
    return statuses


def autoscaling_status() -> bytes | None:
    """The v1 autoscaler monitor's JSON status from the GCS key-value store (what `ray status` reads)."""
    from ray.experimental.internal_kv import _internal_kv_get

    return _internal_kv_get(AUTOSCALING_STATUS_KEY)


def cluster_config() -> dict | None:
    """Autoscaler v2's node groups as a plain dict (None under the v1 monitor)."""
    from ray._private.state import state

    return node_groups(state.get_cluster_config())


def node_groups(config) -> dict | None:
    """Ray's ``autoscaler_pb2.ClusterConfig`` protobuf as the plain dict ``studies.runner.autoscaling`` reads."""
    if config is None:
        return None
    return {"node_group_configs": [{"name": group.name, "resources": dict(group.resources),
                                    "max_count": group.max_count} for group in config.node_group_configs]}


def restored_run_config(tuner):
    """The run config a restored Tuner's ``fit`` reads (Tuner has no public setter: a resume's new callbacks,
    retries and resources go in here)."""
    return tuner._local_tuner.get_run_config()


def set_trial_retries(trial, max_failures: int) -> None:
    """A trial's retry budget, read by Tune only when the trial fails."""
    trial.max_failures = max_failures


def trial_resources(trial) -> dict:
    """The resources the trial's placement group asks for, e.g. {"CPU": 1, "GPU": 0.5}."""
    return trial.placement_group_factory.required_resources


def copy_result_to_storage(trial) -> None:
    """Push the driver's copy of the trial's result.json to the trial's folder in storage."""
    from pathlib import Path

    from pyarrow import fs

    local = Path(trial.local_path, "result.json")
    if local.is_file():
        fs.copy_files(str(local), f"{trial.storage.trial_fs_path}/result.json",
                      destination_filesystem=trial.storage.storage_filesystem)


def validate_cluster_yaml(config: dict) -> dict:
    """``ray up``'s own reading of a cluster config, offline: defaults merged, checked against Ray's schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared
