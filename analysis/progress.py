"""Whether a study folder holds a finished study, and each trial's status while it is not.

study.json records the state of the last invocation (running, finished, interrupted, failed) and the
driver's host and pid; a "running" study whose driver is gone was killed (SIGKILL, a lost node). While a
study is not finished, Tune's own snapshot says which trials are done (``analysis/ray_internals.py``).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

from analysis.ray_internals import SNAPSHOT_GLOB, parse_snapshot

FINISHED = "finished"
UNFINISHED = ("INTERRUPTED", "NOT_STARTED", "RUNNING", "PENDING")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def study_state(info: dict) -> str:
    """finished | running | interrupted | failed | killed (marked running, driver gone); a study.json written before
    studies recorded their state counts as finished."""
    state = info.get("state") or FINISHED
    if state != "running":
        return state
    last = (info.get("invocations") or [{}])[-1]
    here = last.get("host") == socket.gethostname()
    if here and last.get("pid") and not _alive(int(last["pid"])):
        return "killed"
    return "running"  # on another host we cannot tell; the driver said it was running


def snapshot_statuses(path: Path) -> dict[str, str] | None:
    """Trial folder -> Tune status in the newest experiment snapshot; None when there is none."""
    snapshots = sorted(path.glob(SNAPSHOT_GLOB))
    for snapshot in reversed(snapshots):  # the newest may be caught mid-write
        try:
            return parse_snapshot(snapshot.read_text())
        except (ValueError, OSError):
            continue
    return None


def describe(state: str, trials) -> str:
    """One line for the progress output and the report's notes."""
    unfinished = int(trials["status"].isin(UNFINISHED).sum())
    what = {"running": "is still running", "interrupted": "was interrupted", "killed": "stopped without finishing "
            "(its driver is gone)", "failed": "failed"}.get(state, state)
    return (f"INCOMPLETE: the study {what}; {unfinished} of {len(trials)} trial(s) unfinished "
            "(not ranked; --include-unfinished ranks them on their last epoch)")
