"""The tracking queue that keeps every MLflow call off Tune's event loop, and what is said when the server stays away.

``TrackingQueue``: Tune's callbacks only enqueue; one thread applies the records in order. While the tracking server
does not answer, the thread probes it with backoff and the study goes on (its results, Tune's result.json files,
hold every epoch meanwhile); when it answers again the waiting records follow in order. Every record is idempotent
(runs found again by tag, epochs already logged skipped), so one sent again after a lost answer logs nothing twice.
At the end of a study the queue is drained for a bounded time (``drain_seconds``); what a server that never came back
did not get is an ``IncompleteRuns``, with the command that replays it (``replay_command``).
"""
from __future__ import annotations

import collections
import logging
import os
import re
import shlex
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)
# MLflow's own retries of an HTTP request (7, with backoff: about 4 minutes) would stop the queue's thread that long
# at every call and hide an outage: one try each, and the queue's retries below (MLflow reads these per request)
SHORT_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
PROBE_MAX_S = 5.0  # while away, the server's /health is asked at 1, 2, 4, 5, 5, ... s
RETRIES = 4  # a call that fails while the server answers is tried this often, then dropped as an error
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def short_http_retries(uri: str) -> None:
    """One try per MLflow HTTP request in this process (the driver; trials never import MLflow); a user's own
    settings win."""
    if uri.startswith(("http://", "https://")):
        for name, value in SHORT_HTTP.items():
            os.environ.setdefault(name, value)


def answers(uri: str, timeout: float = 5.0) -> bool:
    """Whether the tracking server answers /health; a database or folder store always "answers"."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def refused(err: BaseException) -> bool:
    """A request the server refused (HTTP 4xx but 429): sending it again cannot succeed."""
    status = getattr(err, "get_http_status_code", None)
    return callable(status) and 400 <= status() < 500 and status() != 429


def why(err: BaseException) -> str:
    """The cause of a failed request in a few words (``Connection refused``), not MLflow's paragraph around it."""
    text = str(err)
    found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text) or re.search(r"(?i)(read timed out|timed out)", text)
    return found.group(1).strip() if found else ((text.strip().splitlines() or [type(err).__name__])[-1][:200])


def masked(uri: str) -> str:
    """The URI as printed: a password in it (``postgresql://user:secret@host/db``) as ``***`` (``errors.redact``,
    imported here: ``errors`` imports the pre-flight, which imports this module through ``tracking``)."""
    from studies.runner.errors import redact

    return redact(uri)


def clock(seconds: float) -> str:
    return time.strftime(TIME_FORMAT, time.localtime(seconds))


@dataclass
class Record:
    trial_id: str | None  # None: the study's own run
    what: str
    function: Callable
    args: tuple


class TrackingQueue:
    """MLflow calls applied in order by one thread of the driver; see the module's docstring."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.errors: list[BaseException] = []  # records dropped: refused, or failing while the server answers
        self.away_since: float | None = None  # the current outage (time.time()), until its backlog is replayed
        self._unreachable_since: float | None = None  # until the server answers again
        self._back_at: float | None = None  # when the server answered again
        self._replayed = self._backlog = 0  # records applied since, of those that waited for it
        self._items: collections.deque[Record] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, trial_id: str | None, what: str, function: Callable, *args) -> None:
        """Queue ``function(*args)``; returns at once."""
        with self._cond:
            self._items.append(Record(trial_id, what, function, args))
            if self._thread is None and not self._closed:
                short_http_retries(self.uri)
                self._thread = threading.Thread(target=self._run, name="mlflow-tracking", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def drain(self, away_limit_s: float) -> bool:
        """Wait until every record is applied (True), or until the server has been away ``away_limit_s`` seconds
        of this wait (False: the records left are ``pending``). A server that answers is waited for."""
        start = time.time()
        with self._cond:
            while self._items and not self._closed:
                away = self._unreachable_since
                if away is not None and time.time() - max(away, start) >= away_limit_s:
                    return False
                self._cond.wait(0.2)
            return not self._items

    def pending(self) -> list[Record]:
        with self._cond:
            return list(self._items)

    def close(self) -> None:
        """Stop the thread after its current call; the records left stay unapplied (a replay sends them)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                record = self._items[0]
            applied = self._apply(record)
            with self._cond:
                if not applied:  # closed while waiting for the server: the record stays pending
                    return
                self._items.popleft()
                if self._back_at is not None:  # a record that waited for the server
                    self._replayed += 1
                    if self._replayed >= self._backlog:
                        self._say_back()
                self._cond.notify_all()

    def _apply(self, record: Record) -> bool:
        """Apply one record, waiting out an outage; False only when the queue was closed meanwhile."""
        failures = 0
        while not self._closed:
            try:
                record.function(*record.args)
                return True
            except Exception as err:  # noqa: BLE001 - classified: refused, outage, or failing while reachable
                if refused(err):
                    return self._drop(record, err)
                if answers(self.uri):
                    failures += 1
                    if failures >= RETRIES:
                        return self._drop(record, err)
                    self._sleep(2.0 ** (failures - 1))
                    continue
                self._away(err)
                self._wait_until_back()
        return False

    def _drop(self, record: Record, err: BaseException) -> bool:
        log.error("MLflow: %s failed: %s", record.what, str(err).strip()[-500:])
        self.errors.append(err)
        return True

    def _away(self, err: BaseException) -> None:
        with self._cond:
            self._unreachable_since = self._unreachable_since or time.time()
            self._back_at = None
            if self.away_since is not None:  # away again before the backlog was replayed: the same outage
                return
            self.away_since = self._unreachable_since
        reason = why(err)
        log.warning("MLflow tracking away since %s: %s does not answer (%s); the study goes on, its records wait "
                    "in order", clock(self.away_since), masked(self.uri), reason)

    def _wait_until_back(self) -> None:
        delay = 1.0
        while not self._closed:
            self._sleep(delay)
            if answers(self.uri):
                with self._cond:
                    self._unreachable_since, self._back_at = None, time.time()
                    self._backlog = self._replayed + len(self._items)
                return
            delay = min(delay * 2, PROBE_MAX_S)

    def _say_back(self) -> None:  # under the lock, when the backlog is applied
        log.warning("MLflow tracking back at %s after %.0f s away: %d records replayed in order", clock(self._back_at),
                    self._back_at - self.away_since, self._replayed)
        self.away_since, self._back_at, self._replayed = None, None, 0

    def _sleep(self, seconds: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._closed, seconds)
# at the end of a study, how long the tracking server may stay away before its runs are left to a replay
DRAIN_S, DRAIN_ENV = 60.0, "VISION_TUNE_TRACKING_DRAIN_S"


def drain_seconds() -> float:
    return float(os.environ.get(DRAIN_ENV) or DRAIN_S)


def replay_command(study_dir: str, uri: str) -> str:
    """The command that sends a study's results to MLflow (a password in the URI masked: put it back)."""
    return shlex.join(["python", "-m", "studies.runner.replay", study_dir, "--mlflow-uri", masked(uri)])


@dataclass(frozen=True)
class IncompleteRuns:
    """What the end of a study could not send to a tracking server that stayed away."""

    trials: list[str]  # trial folders whose runs lack records (epochs, artifacts or their end)
    since: str  # when tracking went away
    command: str  # the replay that sends them (and the study's run's end) once the server answers

    def lines(self, uri: str) -> list[str]:
        named = f": {', '.join(self.trials)}" if self.trials else ""
        return [f"MLflow: {masked(uri)} away since {self.since}: {len(self.trials)} trial run(s) left incomplete"
                f"{named}, and the study's run; the results are complete. Once it answers, replay them:",
                f"  {self.command}"]
