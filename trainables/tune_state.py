"""What Tune's own experiment snapshot says about each trial, read as plain JSON (no Ray needed).

The snapshot (``experiment_state-<time>.json`` in the study folder) is what ``Tuner.restore`` resumes
from, so it is the truth about which trials are done: after Ctrl-C, Tune 2.60 saves it with the running
trials as RUNNING and only then marks them TERMINATED in memory while stopping them; the ResultGrid it
returns therefore calls every trial terminated. The runner and the analysis both read statuses here.
"""
from __future__ import annotations

import json

SNAPSHOT_GLOB = "experiment_state-*.json"
FINISHED, FAILED = "TERMINATED", "ERROR"


def parse_snapshot(text: str) -> dict[str, str]:
    """Trial folder name (``relative_logdir``) -> Tune status (PENDING, RUNNING, PAUSED, TERMINATED, ERROR)."""
    statuses = {}
    for entry in json.loads(text).get("trial_data", []):
        state = json.loads(entry[0]) if isinstance(entry, (list, tuple)) else entry
        if isinstance(state, str):
            state = json.loads(state)
        statuses[state.get("relative_logdir") or state.get("trial_id")] = state.get("status", "")
    return statuses


def outcome(tune_status: str | None, error: bool, epochs_run: int) -> str:
    """The trials table's status: OK only for a trial Tune recorded as finished (its epochs, or stopped by the
    scheduler, as ASHA does); one that a stop cut short (running, paused, or with epochs) is INTERRUPTED, one
    still waiting for its first slot NOT_STARTED."""
    if error or tune_status == FAILED:
        return "ERROR"
    if tune_status in (None, FINISHED):
        return "OK"
    return "NOT_STARTED" if tune_status in ("PENDING", "") and not epochs_run else "INTERRUPTED"
