"""A study's own MLflow run (the parent of its trials' runs), its best model's registration, and the tracking queue
that keeps every MLflow call off Tune's event loop.

The parent is found again by its tag, so retries, ``--resume`` and a rebuilt report reuse it; within one
driver a lock makes find-or-create atomic (after a resume the restored callback's tracker and the runner's
both ask for it).

``TrackingQueue``: Tune's callbacks only enqueue; one thread applies the records in order. While the tracking server
does not answer, the thread probes it with backoff and the study goes on (its results, Tune's result.json files,
hold every epoch meanwhile); when it answers again the waiting records follow in order. Every record is idempotent
(runs found again by tag, epochs already logged skipped), so one sent again after a lost answer logs nothing twice.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)
BEST_TRIAL_TAG, BEST_RUN_TAG = "vision_tune.best_trial", "vision_tune.best_run"
TRIAL_ID = re.compile(r"(?:[0-9a-f]{5}_\d{5}|[0-9a-f]{8})$")  # Tune's: a grid's <experiment>_<index>, a searcher's
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


def parent_params(base: dict, argv: list[str], metric: str, mode: str) -> dict[str, str]:
    """The parent run's params: the base config (flat, as the trials'), the command line, metric and mode."""
    from analysis.naming import flatten

    params = {key: str(value) for key, value in flatten(base).items()}
    params.update({"argv": " ".join(argv)[:6000], "metric": metric, "mode": mode})
    return params


def trial_id_of(folder: str) -> str:
    """Tune's trial id from a trial folder (``trial_dirname``: <trainable>_<id>): ``1a2b3_00000`` for a grid's
    trials, ``1a2b3c4d`` for a searcher's."""
    found = TRIAL_ID.search(folder)
    return found.group(0) if found else folder.rsplit("_", 1)[-1]


def best_trial_id(table, metric: str) -> tuple[str, float] | None:
    """(Tune trial id, metric) of the summary table's best OK trial (its first row: the table is sorted)."""
    if table.empty or metric not in table:
        return None
    ok = table[(table["status"] == "OK") & table[metric].notna()]
    if ok.empty:
        return None
    return trial_id_of(str(ok.iloc[0]["trial"])), float(ok.iloc[0][metric])


def logged_model_id(client, experiment_id: str, run_id: str, name: str, ready_only: bool = False) -> str | None:
    """The id of the logged model ``name`` that ``run_id`` produced (None when it logged none; with ``ready_only``,
    none whose upload finished)."""
    from mlflow.entities import LoggedModelStatus

    for model in client.search_logged_models(experiment_ids=[experiment_id], filter_string=f"name = '{name}'"):
        if model.source_run_id == run_id and (not ready_only or model.status == LoggedModelStatus.READY):
            return model.model_id
    return None


def register(client, name: str, model_id: str, run_id: str, uri: str) -> str:
    """Register a logged model as a new version of registered model ``name`` (once: a resumed study that ends
    again keeps the version it registered); returns the version. ``uri``: the study's tracking URI."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    for version in client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'"):
        if version.model_id in (model_id, None):
            return str(version.version)
    # the registry looks the models:/ source up through the process's global tracking URI, which need not be
    # the study's (a user's MLFLOW_TRACKING_URI): point it at the study's store while registering
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        version = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id)
    finally:
        mlflow.set_tracking_uri(previous)
    return str(version.version)


def log_dataset_inputs(client, run_ids: list[str], described: str) -> None:
    """A trial's data sets (``trainables/lineage.py``'s JSON) as dataset inputs of each run; MLflow skips the
    ones a run already has (a resumed trial reports them again)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for item in json.loads(described):
        profile = json.dumps({"num_rows": item["size"], "split": item["split"], "image_size": item["image_size"]})
        dataset = Dataset(name=item["name"], digest=item["digest"], source_type="local",
                          source=json.dumps({"uri": item["source"]}), profile=profile)
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", item["context"])]))
    for run_id in run_ids:
        client.log_inputs(run_id, datasets=inputs)


def log_model_folder(client, run_id: str, experiment: str, folder: Path, epoch: int, name: str = "model") -> None:
    """A trial's MLflow model folder as the run's logged model ``name``, recorded as ``mlflow.pytorch.log_model``
    records one (a LoggedModel from the run, its artifacts, the run's output at the last epoch) without loading
    the model on the driver; a model already uploaded (before a resume) is not uploaded twice, and one whose upload
    was cut (the server went away) is completed."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    if logged_model_id(client, experiment, run_id, name, ready_only=True):
        return
    model_id = logged_model_id(client, experiment, run_id, name) or client.create_logged_model(
        experiment, name=name, source_run_id=run_id, tags={"mlflow.modelFlavor": "pytorch"},
        model_type="pytorch").model_id
    client.log_model_artifacts(model_id, str(folder))
    client.finalize_logged_model(model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(model_id, step=epoch)])
