"""Tune's experiment snapshots in the driver's loop and the seconds they take, seen through public hooks only.

Each step of Tune's loop (``TuneController.step``) asks the stopper ``stop_all()``, then saves the experiment state
when a snapshot is due, which asks every callback for its ``get_state()``, then calls the callbacks' ``on_step_end``.
A snapshot's seconds are that stretch of its step less the median stretch of the steps without one (Tune's actor
clean-up). A snapshot is *forced* when a trial has saved ``num_to_keep`` checkpoints since the last one
(``on_checkpoint``), as ``CheckpointConfig(num_to_keep)`` makes Tune do; the others are Tune's periodic ones.
"""
from __future__ import annotations

import time
from collections import Counter

from ray import tune


class SnapshotClock(tune.Callback):
    """Pass it as a callback and its ``stopper`` as ``RunConfig(stop=...)``; ``totals()`` after ``fit()``."""

    def __init__(self, num_to_keep: int | None) -> None:
        self.num_to_keep = num_to_keep
        self.stopper = StepStart(self)
        self.step_start: float | None = None
        self.saved = False
        self.checkpoints: Counter = Counter()  # per trial, since the last snapshot
        self.seconds: dict[str, list[float]] = {"forced": [], "periodic": [], "none": []}

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        self.checkpoints[trial.trial_id] += 1

    def get_state(self) -> None:
        self.saved = self.step_start is not None  # the final snapshot, after the loop, is not the loop's
        return None  # nothing to restore: Tune then writes no callback file

    def on_step_end(self, iteration, trials, **info) -> None:
        if self.step_start is None:
            return
        kind = "none"
        if self.saved:
            forced = bool(self.num_to_keep) and max(self.checkpoints.values(), default=0) >= self.num_to_keep
            kind = "forced" if forced else "periodic"
            self.checkpoints.clear()
        self.seconds[kind].append(time.perf_counter() - self.step_start)
        self.step_start, self.saved = None, False

    def totals(self) -> dict:
        """Steps of the loop; snapshots of each kind and their seconds."""
        idle = sorted(self.seconds["none"])
        base = idle[len(idle) // 2] if idle else 0.0
        spent = {"steps": sum(len(times) for times in self.seconds.values())}
        for kind in ("forced", "periodic"):
            spent[kind] = len(self.seconds[kind])
            spent[f"{kind}_s"] = sum(max(0.0, seconds - base) for seconds in self.seconds[kind])
        return spent


class StepStart(tune.Stopper):
    """Stops nothing: marks where the snapshot's part of a step begins (``stop_all`` comes right before it)."""

    def __init__(self, clock: SnapshotClock) -> None:
        self.clock = clock

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        self.clock.step_start = time.perf_counter()
        return False
