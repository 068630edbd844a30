"""What a study prints while it runs, for people: within 100 columns, trials by their variant names.

On a terminal: a block redrawn at most twice a second, a progress bar with an ETA from the measured epoch times,
then one line per running (and recently ended) trial: name, state, epoch/total, the study's metric and its best
so far. Anywhere else (CI logs, ``ray job logs``, a file): plain lines, no control codes, one when a trial starts or
ends and a progress line every ``PROGRESS_S`` seconds. Tune's own table shows only with ``--verbose``. No Ray here:
the Tune callback that feeds it lives in ``tuner.py``.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from analysis.naming import VariantNames, fmt
from analysis.naming import flatten as flat_config

WIDTH = 100
PROGRESS_S = 30.0  # between progress lines when the output is not a terminal
REDRAW_S = 0.5
SHOWN = 12  # trial lines on a terminal: the running ones first, then the latest ended


@dataclass
class TrialLine:
    name: str
    state: str = "PENDING"
    epoch: int = 0
    value: float | None = None
    best: float | None = None
    ended_at: float = 0.0


@dataclass
class Console:
    """Progress of one study; ``stream`` is where it prints (a terminal or not)."""

    names: VariantNames
    metric: str
    mode: str
    trials: int
    epochs: int
    stream: TextIO | None = None
    started: float = field(default_factory=time.monotonic)
    lines: dict = field(default_factory=dict)
    seen: dict = field(default_factory=dict)  # variant name -> repeats seen (a suffix #2, #3 for seeds)
    done_epochs: int = 0
    last_draw: float = 0.0
    drawn: int = 0

    def __post_init__(self) -> None:
        self.stream = self.stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def __getstate__(self) -> dict:  # Tune pickles its callbacks into the study's snapshot: no stream there
        return {**self.__dict__, "stream": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.stream, self.tty = sys.stdout, False

    def name(self, trial_id: str, config: dict) -> str:
        """The trial's name in MLflow, the report and trials.csv, with #k for the k-th seed of a variant."""
        if trial_id not in self.lines:
            base = self.names.run_name(flat_config(config))
            self.seen[base] = self.seen.get(base, 0) + 1
            self.lines[trial_id] = TrialLine(base if self.seen[base] == 1 else f"{base} #{self.seen[base]}")
        return self.lines[trial_id].name

    def started_trial(self, trial_id: str, config: dict) -> None:
        name = self.name(trial_id, config)
        self.lines[trial_id].state = "RUNNING"
        if not self.tty:
            self._print(f"start  {name}")
        self.tick()

    def result(self, trial_id: str, config: dict, result: dict) -> None:
        self.name(trial_id, config)
        line = self.lines[trial_id]
        epoch = int(result.get("epoch", result.get("training_iteration", 0)) or 0)
        self.done_epochs += max(0, epoch - line.epoch)
        line.epoch, line.state = epoch, "RUNNING"
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            line.value = float(value)
            line.best = value if line.best is None else (min if self.mode == "min" else max)(line.best, value)
        self.tick()

    def ended(self, trial_id: str, config: dict, state: str) -> None:
        name = self.name(trial_id, config)
        line = self.lines[trial_id]
        line.state, line.ended_at = state, time.monotonic()
        if not self.tty:
            self._print(self._trial(line, prefix=f"{state.lower():6s} ").rstrip())
        self.tick()

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty and (force or now - self.last_draw >= REDRAW_S):
            self._redraw()
            self.last_draw = now
        elif not self.tty and (force or now - self.last_draw >= PROGRESS_S):
            self._print(self.progress())
            self.last_draw = now

    def close(self) -> None:
        self.tick(force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def progress(self) -> str:
        """``[#####.....]  12/40 epochs  3/5 trials ended  best 0.3012  ETA 1m20s``"""
        total = max(self.trials * self.epochs, 1)
        done = min(self.done_epochs, total)
        filled = round(20 * done / total)
        ended = sum(line.state in ("DONE", "ERROR", "STOPPED") for line in self.lines.values())
        values = [line.best for line in self.lines.values() if line.best is not None]
        best = (min if self.mode == "min" else max)(values) if values else None
        elapsed = time.monotonic() - self.started
        eta = elapsed / done * (total - done) if done else None
        parts = [f"[{'#' * filled}{'.' * (20 - filled)}]", f"{done}/{total} epochs", f"{ended}/{self.trials} trials ended",
                 f"best {self.metric} {fmt(best)}", f"ETA {duration(eta)}" if eta is not None else "ETA -",
                 f"elapsed {duration(elapsed)}"]
        return clip("  ".join(parts))

    def _trial(self, line: TrialLine, prefix: str = "") -> str:
        width = min(40, max(len(other.name) for other in self.lines.values()))
        return clip(f"{prefix}{line.name[:width]:{width}s}  {line.state:7s} {line.epoch:>3d}/{self.epochs:<3d} "
                    f"{self.metric} {fmt(line.value):>8s}  best {fmt(line.best):>8s}")

    def _redraw(self) -> None:
        running = [line for line in self.lines.values() if line.state in ("RUNNING", "PENDING")]
        ended = sorted((line for line in self.lines.values() if line not in running), key=lambda l: -l.ended_at)
        block = [self.progress(), *(self._trial(line) for line in (running + ended)[:SHOWN])]
        up = f"\x1b[{self.drawn}F" if self.drawn else ""
        self.stream.write(up + "".join(f"{text}\x1b[K\n" for text in block))
        self.stream.flush()
        self.drawn = len(block)

    def _print(self, text: str) -> None:
        self.stream.write(clip(text) + "\n")
        self.stream.flush()


def clip(text: str) -> str:
    return text if len(text) <= WIDTH else text[:WIDTH - 1] + "…"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
