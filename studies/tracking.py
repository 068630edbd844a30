"""MLflow for studies: one experiment per study, one run per trial, idempotent across retries and resumes.

A trial's run is found again by its tag ``vision_tune.trial_id``, so a retried trial or a resumed
study keeps writing into the same run, and epochs already logged are not logged twice.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)
TRIAL_TAG = "vision_tune.trial_id"
STEP_METRIC = "epoch"


def resolve_uri(uri: str | None) -> str:
    """Default sqlite in the working directory; relative sqlite paths made absolute (trials run elsewhere)."""
    if not uri:
        return f"sqlite:///{os.path.abspath('mlflow.db')}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{os.path.abspath(uri[len('sqlite:///'):])}"
    return uri


def local_artifact_root(uri: str) -> Path | None:
    """Where a new experiment's artifacts go on this machine: beside a sqlite database (not in whatever the
    cwd is), or inside a file store; None for a tracking server, which stores them itself."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent / "mlartifacts"
    if uri.startswith("file:"):
        return Path(urllib.parse.urlparse(uri).path)
    if "://" not in uri and uri != "databricks":  # a bare folder is a file store too
        return Path(uri).expanduser().resolve()
    return None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail before any trial starts when an MLflow server does not answer, or a sqlite folder is missing."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as err:
            raise ConnectionError(f"--mlflow-uri {uri}: no MLflow server answers at {url} ({err}). Start one with "
                                  "'mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///ABS/mlflow.db'"
                                  " or pass a sqlite:/// URI.") from None
        raise ConnectionError(f"--mlflow-uri {uri}: {url} did not answer 200")
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise FileNotFoundError(f"--mlflow-uri {uri}: folder {folder} does not exist")


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"optim/lr": "0.001", ...}, as MLflow params."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        else:
            flat[name] = str(value)
    return flat


def numeric_metrics(result: dict) -> dict[str, float]:
    """The reported numbers worth a curve: every finite number except Tune's bookkeeping."""
    skip = {"timestamp", "pid", "done", "training_iteration", "time_since_restore", "iterations_since_restore",
            "time_this_iter_s", "time_total_s"}
    return {key: float(value) for key, value in result.items()
            if key not in skip and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(float(value))}


class StudyTracker:
    """Writes a study's trials into MLflow; holds no client until used, so it pickles with Tune's state."""

    def __init__(self, uri: str, experiment: str, study_tags: dict | None = None) -> None:
        self.uri = uri
        self.experiment = experiment
        self.study_tags = study_tags or {}
        self._client = None
        self._runs: dict[str, tuple[str, int]] = {}  # trial id -> (run id, last logged epoch)
        self._warming: threading.Thread | None = None
        self._warm_error: BaseException | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "_runs": {}, "_warming": None, "_warm_error": None}

    def warm_up(self) -> None:
        """Import MLflow, open the store (creating its tables on a new sqlite file) and the experiment in a
        background thread: seconds of driver work that otherwise block Tune's loop at the first trial start."""
        def work() -> None:
            try:
                self.experiment_id()
            except BaseException as err:  # raised again by ``client`` in the thread that needs it
                self._warm_error = err

        self._warming = threading.Thread(target=work, name="mlflow-warm-up", daemon=True)
        self._warming.start()

    @property
    def client(self):
        warming = getattr(self, "_warming", None)
        if warming is not None and warming is not threading.current_thread():
            warming.join()
            self._warming = None
            if self._warm_error is not None:
                raise self._warm_error
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found:
            return found.experiment_id
        root = local_artifact_root(self.uri) if self.uri.startswith("sqlite:///") else None
        location = (root / self.experiment).as_uri() if root else None
        return self.client.create_experiment(self.experiment, artifact_location=location)

    def start(self, trial_id: str, trial_name: str, config: dict) -> str:
        """The trial's run: found again by tag after a retry or resume, else created with the config as params."""
        if trial_id in self._runs:
            return self._runs[trial_id][0]
        experiment_id = self.experiment_id()
        found = self.client.search_runs([experiment_id], f"tags.`{TRIAL_TAG}` = '{trial_id}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
            history = self.client.get_metric_history(run_id, STEP_METRIC)
            last = int(max((m.value for m in history), default=0))
            self.client.update_run(run_id, status="RUNNING")
            log.info("trial %s continues MLflow run %s after epoch %d", trial_id, run_id, last)
        else:
            tags = {TRIAL_TAG: trial_id, "mlflow.runName": trial_name, **self.study_tags}
            run_id = self.client.create_run(experiment_id, tags=tags).info.run_id
            params = flatten(config)
            from mlflow.entities import Param

            self.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
            last = 0
        self._runs[trial_id] = (run_id, last)
        return run_id

    def log_result(self, trial_id: str, result: dict) -> None:
        """One epoch's metrics at step = epoch; epochs already in MLflow are skipped."""
        run_id, last = self._runs[trial_id]
        epoch = int(result.get(STEP_METRIC, result.get("training_iteration", 0)))
        if epoch <= last:
            return
        from mlflow.entities import Metric

        timestamp = int(result.get("timestamp", 0) * 1000)
        metrics = [Metric(key, value, timestamp, epoch) for key, value in numeric_metrics(result).items()]
        self.client.log_batch(run_id, metrics=metrics)
        self._runs[trial_id] = (run_id, epoch)

    def finish(self, trial_id: str, status: str, artifacts_dir: str | None = None, error: str | None = None) -> None:
        """Upload the final checkpoint folder (model state and artifacts), then close the run."""
        if trial_id not in self._runs:
            return
        run_id, _ = self._runs.pop(trial_id)
        if artifacts_dir and os.path.isdir(artifacts_dir):
            self.client.log_artifacts(run_id, artifacts_dir, artifact_path="checkpoint")
        if error:
            self.client.set_tag(run_id, "vision_tune.error", error[-4000:])
        self.client.set_terminated(run_id, status=status)

    def kill_unfinished(self) -> int:
        """After an interrupted study, close the trials' runs still RUNNING as KILLED (MLflow's status for a run
        that was stopped); a resume finds them again by tag and sets them RUNNING. Returns how many."""
        found = self.client.search_runs([self.experiment_id()], "attributes.status = 'RUNNING'")
        killed = [run.info.run_id for run in found if TRIAL_TAG in run.data.tags]
        for run_id in killed:
            self.client.set_terminated(run_id, status="KILLED")
        self._runs.clear()
        return len(killed)
