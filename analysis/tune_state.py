"""A trial's status in the trials table, from Tune's snapshot status (``ray_internals.parse_snapshot``)."""
from __future__ import annotations


FINISHED, FAILED = "TERMINATED", "ERROR"


def outcome(tune_status: str | None, error: bool, epochs_run: int) -> str:
    """The trials table's status: OK only for a trial Tune recorded as finished (its epochs, or stopped by the
    scheduler, as ASHA does); one that a stop cut short (running, paused, or with epochs) is INTERRUPTED, one
    still waiting for its first slot NOT_STARTED."""
    if error or tune_status == FAILED:
        return "ERROR"
    if tune_status in (None, FINISHED):
        return "OK"
    return "NOT_STARTED" if tune_status in ("PENDING", "") and not epochs_run else "INTERRUPTED"
