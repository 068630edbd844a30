"""MLflow for studies: one experiment per study, one parent run per study, one nested run per trial,
idempotent across retries, resumes and replays.

A trial's run is found again by its tag ``vision_tune.trial_id``, so a retried trial or a resumed
study keeps writing into the same run, and epochs already logged are not logged twice. Runs are named
by their variant (``C adam lr=0.001``, the analysis tables' letters, ``analysis/naming.py``); a
trial's data sets become its inputs, its final artifacts (figures' data, confusion matrix) its artifacts, and the
model the driver builds from its last checkpoint (``export.py``) its logged model: the best trial's (default),
every finished trial's (``--log-models all``) or none. Trial weights stay in Tune's checkpoints, once.

Tracking never holds the study up: Tune's callback only queues (``trial_started``, ``trial_result``, ``trial_ended``)
and the tracking queue's thread (``tracking_queue.TrackingQueue``) applies ``start``, ``log_result`` and ``finish`` in
order, waiting out a server that does not answer. At the end ``end_study`` waits for the queue a bounded time; what
a server that never came back did not get is named, with the command that replays it from the study's results
(``python -m studies.runner.replay``, which calls these same methods).
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from analysis.mlflow_store import experiment_id, find_or_create_parent, open_client, runs_url, ui_command
from analysis.naming import VariantNames
from analysis.naming import flatten as flat_config
from studies.runner.export import MODEL_DIR, export_checkpoint, exportable
from studies.runner.mlflow_runs import (BEST_RUN_TAG, BEST_TRIAL_TAG, all_runs, best_trial_id, flatten,
                                        log_dataset_inputs, log_model_folder, logged_model_id, numeric_metrics,
                                        register, trial_id_of)
from studies.runner.tracking_queue import (IncompleteRuns, TrackingQueue, answers, clock, drain_seconds, refused,
                                           replay_command, short_http_retries)
from trainables.checkpoints import ARTIFACTS
from trainables.lineage import DATASETS_KEY
from trainables.tune_io import AMP_KEY, RESTORED_KEY

log = logging.getLogger(__name__)
TRIAL_TAG = "vision_tune.trial_id"
VARIANT_TAG = "vision_tune.variant"
STEP_METRIC = "epoch"
LOG_MODELS = ("best", "all", "none")  # --log-models: which trials' final models become MLflow logged models
TAG_KEYS = {AMP_KEY: "vision_tune.amp_dtype", RESTORED_KEY: "vision_tune.restored_from"}  # reported strings: tags


class StudyTracker:
    """Writes a study's trials into MLflow; holds no client until used, so it pickles with Tune's state.

    On Tune's loop only ``trial_started``, ``trial_result`` and ``trial_ended`` are called: they queue the other
    methods, which the tracking queue's thread applies (a replay calls them directly)."""

    def __init__(self, uri: str, experiment: str, study_tags: dict | None = None) -> None:
        self.uri = uri
        self.experiment = experiment
        self.study_tags = study_tags or {}
        self.study_dir = ""  # the parent run's key and params, see ``plan``
        self.params: dict[str, str] | None = None
        self.names = VariantNames([])
        self.task, self.log_models = "", "best"  # see ``plan``
        self.incomplete: IncompleteRuns | None = None  # set by ``end_study`` when the server stayed away
        self._client = None
        self._runs: dict[str, tuple[str, int]] = {}  # trial id -> (run id, last logged epoch)
        self._ids: dict[str, str] = {}  # "experiment" and "parent" ids, once known
        self._inputs: set[str] = set()  # runs whose data sets this driver logged
        self._warming: threading.Thread | None = None
        self._warm_error: BaseException | None = None
        self._queue: TrackingQueue | None = None
        self._announced: set[str] = set()  # trials whose run was queued (Tune's loop)

    def __getstate__(self) -> dict:  # Tune pickles its callbacks into every experiment snapshot
        return {**self.__dict__, "_client": None, "_runs": {}, "_ids": {}, "_inputs": set(), "_warming": None,
                "_warm_error": None, "_queue": None, "_announced": set(), "incomplete": None, "_known": None,
                "_creating": None}

    def __setstate__(self, state: dict) -> None:  # a tracker pickled by an older version lacks newer fields
        self.__init__(state["uri"], state["experiment"], state.get("study_tags"))
        self.__dict__.update(state)

    def plan(self, study_dir: str, params: dict[str, str], variants: list[dict],
             varied: list[str] | None = None, task: str = "", log_models: str = "best") -> None:
        """The study's folder and the parent run's params, and the study's variants (flat configs in Tune's trial
        order) that name its trials' runs; ``varied``: the keys that vary when the variants are not known (a
        sampled search); ``task``: the configs' task (the driver rebuilds models from checkpoints with it)."""
        self.study_dir, self.params = study_dir, params
        self.names = VariantNames(variants, varied)
        self.task, self.log_models = task, log_models

    def warm_up(self) -> None:
        """Import MLflow, open the store (creating its tables on a new sqlite file) and the experiment in a
        background thread: seconds of driver work that otherwise delay the first trial's records."""
        def work() -> None:
            try:
                self.parent_run_id()
            except BaseException as err:  # raised again by ``client`` in the thread that needs it
                self._warm_error = err

        short_http_retries(self.uri)
        self._warming = threading.Thread(target=work, name="mlflow-warm-up", daemon=True)
        self._warming.start()

    @property
    def client(self):
        warming = getattr(self, "_warming", None)
        if warming is not None and warming is not threading.current_thread():
            warming.join()
            self._warming = None
            error, self._warm_error = self._warm_error, None
            if error is not None:  # once: the next call opens the store again (the server may be back)
                raise error
        if self._client is None:
            self._client = open_client(self.uri)  # a new sqlite store is created under a file lock
        return self._client

    @property
    def queue(self) -> TrackingQueue:
        if self._queue is None:
            self._queue = TrackingQueue(self.uri)
        return self._queue

    # --- Tune's loop: queue, never wait ---

    def trial_started(self, trial_id: str, trial_name: str, config: dict) -> None:
        if trial_id not in self._announced:
            self._announced.add(trial_id)
            self.queue.submit(trial_id, f"the run of trial {trial_id}", self.start, trial_id, trial_name, config)

    def trial_result(self, trial_id: str, result: dict) -> None:
        epoch = result.get(STEP_METRIC, result.get("training_iteration"))
        self.queue.submit(trial_id, f"epoch {epoch} of trial {trial_id}", self.log_result, trial_id, dict(result))

    def trial_ended(self, trial_id: str, status: str, checkpoint=None, config: dict | None = None,
                    error_file: str | None = None) -> None:
        """``checkpoint``: the trial's final ``tune.Checkpoint`` (its artifacts, and its model with
        ``--log-models all``); ``error_file``: the file of a failed trial's error, read on the queue's thread."""
        self._announced.discard(trial_id)
        if checkpoint is not None:
            self.queue.submit(trial_id, f"the final artifacts of trial {trial_id}", self.upload_final, trial_id,
                              checkpoint, config)
        self.queue.submit(trial_id, f"the end of trial {trial_id}", self._close, trial_id, status, error_file)

    # --- the queue's thread, or a replay ---

    def experiment_id(self) -> str:
        if "experiment" not in self._ids:
            self._ids["experiment"] = experiment_id(self.client, self.uri, self.experiment)
        return self._ids["experiment"]

    def parent_run_id(self) -> str:
        """The study's own run, found by tag (after a retry or ``--resume``) or created with ``plan``'s params."""
        if "parent" not in self._ids:
            parent = find_or_create_parent(self.client, self.experiment_id(), self.experiment, self.study_dir,
                                           self.params)
            self.client.update_run(parent, status="RUNNING")
            self._ids["parent"] = parent
        return self._ids["parent"]

    def find_run(self, trial_id: str):
        """The trial's MLflow run (found by its tag), or None. The experiment's runs are read once, page by page, and
        the ones this tracker creates added: a search per trial start would cost a query over every run (at a
        thousand trials, seconds of Tune's loop each)."""
        if getattr(self, "_known", None) is None:
            self._known = {run.data.tags[TRIAL_TAG]: run for run in all_runs(self.client, self.experiment_id())
                           if TRIAL_TAG in run.data.tags}
        if trial_id not in self._known and getattr(self, "_creating", None) == trial_id:  # its answer was lost
            found = self.client.search_runs([self.experiment_id()], f"tags.`{TRIAL_TAG}` = '{trial_id}'",
                                            max_results=1)
            if found:
                self._known[trial_id] = found[0]
        return self._known.get(trial_id)

    def logged_epoch(self, trial_id: str) -> int:
        """The last epoch in the trial's run (started by ``start``)."""
        return self._runs[trial_id][1]

    def start(self, trial_id: str, trial_name: str, config: dict) -> str:
        """The trial's run: found again by tag after a retry, resume or lost answer, else created with the config as
        params."""
        if trial_id in self._runs:
            return self._runs[trial_id][0]
        from mlflow.entities import Param

        experiment_id, parent = self.experiment_id(), self.parent_run_id()
        found = self.find_run(trial_id)
        if found:
            run_id = found.info.run_id
            history = self.client.get_metric_history(run_id, STEP_METRIC)
            last = int(max((m.value for m in history), default=0))
            self.client.update_run(run_id, status="RUNNING")
            if found.data.tags.get("mlflow.parentRunId") != parent:  # a run logged before studies had parents
                self.client.set_tag(run_id, "mlflow.parentRunId", parent)
            if not found.data.params:  # created, then the server went away before its params
                self.client.log_batch(run_id, params=[Param(k, v) for k, v in flatten(config).items()])
            log.info("trial %s continues MLflow run %s after epoch %d", trial_id, run_id, last)
        else:
            flat = flat_config(config)
            tags = {TRIAL_TAG: trial_id, "mlflow.runName": self.names.run_name(flat), "mlflow.parentRunId": parent,
                    VARIANT_TAG: self.names.letter(flat), "vision_tune.trial_name": trial_name, **self.study_tags}
            self._creating = trial_id
            created = self.client.create_run(experiment_id, tags=tags)
            self._known[trial_id], self._creating = created, None
            run_id = created.info.run_id
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in flatten(config).items()])
            last = 0
        self._runs[trial_id] = (run_id, last)
        return run_id

    def log_result(self, trial_id: str, result: dict) -> None:
        """One epoch's metrics at step = epoch; epochs already in MLflow are skipped."""
        if trial_id not in self._runs:  # its run could not be created: said once, by the queue
            return
        run_id, last = self._runs[trial_id]
        if DATASETS_KEY in result and run_id not in self._inputs:
            # the trial's data sets; the parent run gets them too, so its row in the runs table names them
            runs = [run_id] if "parent inputs" in self._ids else [run_id, self.parent_run_id()]
            log_dataset_inputs(self.client, runs, result[DATASETS_KEY])
            self._inputs.add(run_id)
            self._ids["parent inputs"] = "logged"
        epoch = int(result.get(STEP_METRIC, result.get("training_iteration", 0)))
        if epoch <= last:
            return
        from mlflow.entities import Metric, RunTag

        timestamp = int(result.get("timestamp", 0) * 1000)
        metrics = [Metric(key, value, timestamp, epoch) for key, value in numeric_metrics(result).items()]
        tags = [RunTag(TAG_KEYS[key], str(result[key])) for key in TAG_KEYS if key in result]  # e.g. the dtype
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        self._runs[trial_id] = (run_id, epoch)

    def upload_final(self, trial_id: str, checkpoint, config: dict | None = None) -> None:
        """The final checkpoint's artifacts (``checkpoint``: anything with ``as_directory()``, as ``tune.Checkpoint``)
        and, with ``--log-models all`` and the trial's ``config``, the model built from it."""
        if trial_id not in self._runs:
            return
        run_id, epoch = self._runs[trial_id]
        with checkpoint.as_directory() as folder:
            artifacts = Path(folder) / ARTIFACTS
            if artifacts.is_dir() and any(artifacts.iterdir()):
                self.client.log_artifacts(run_id, str(artifacts), artifact_path=ARTIFACTS)
            if config is not None and self.log_models == "all":
                self._log_model(run_id, self.experiment_id(), Path(folder), epoch, config)

    def finish(self, trial_id: str, status: str, checkpoint=None, error: str | None = None,
               config: dict | None = None) -> None:
        """Close the trial's run, after uploading its final ``checkpoint`` (see ``upload_final``) when given."""
        if trial_id not in self._runs:
            return
        if checkpoint is not None:
            self.upload_final(trial_id, checkpoint, config)
        run_id, _ = self._runs[trial_id]
        if error:
            self.client.set_tag(run_id, "vision_tune.error", error[-4000:])
        self.client.set_terminated(run_id, status=status)
        self._runs.pop(trial_id, None)

    def _close(self, trial_id: str, status: str, error_file: str | None) -> None:
        error = Path(error_file).read_text() if error_file and Path(error_file).is_file() else None
        self.finish(trial_id, status, error=error)

    def _log_model(self, run_id: str, experiment: str, folder: Path, epoch: int, config: dict) -> bool:
        """The run's logged model from a checkpoint folder: built here from the trial's weights, or (a checkpoint
        written before 2026-12) the MLflow model folder the trial wrote itself. Returns whether there was one."""
        import tempfile

        if (folder / MODEL_DIR / "MLmodel").is_file():
            log_model_folder(self.client, run_id, experiment, folder / MODEL_DIR, epoch)
            return True
        if not exportable(folder) or logged_model_id(self.client, experiment, run_id, MODEL_DIR, ready_only=True):
            return logged_model_id(self.client, experiment, run_id, MODEL_DIR, ready_only=True) is not None
        with tempfile.TemporaryDirectory(prefix="vt-model-") as tmp:
            log_model_folder(self.client, run_id, experiment,
                             export_checkpoint(self.task, config, folder, Path(tmp) / MODEL_DIR), epoch)
        return True

    # --- the end of the study (the runner's thread) ---

    def end_study(self, table, metric: str, mode: str, register_as: str | None = None,
                  interrupted: bool = False, finals: dict | None = None) -> list[str]:
        """After ``fit``: once the queue has sent every record, record the best trial on the parent run, log its model
        (built from its final checkpoint, ``finals``: trial id -> (checkpoint, config)) and register it as
        ``register_as``, close the parent (KILLED when interrupted: a resume reopens it). Returns the lines the
        runner prints. The queue is waited for while the server answers; when it has been away ``drain_seconds()``,
        the runs left incomplete and their replay command are returned instead, and kept in ``self.incomplete``."""
        self.incomplete, lines = None, []
        self.queue.submit(None, "the study's run (best trial, model, status)", self._end_study, table, metric, mode,
                          register_as, interrupted, finals or {}, lines)
        if self.queue.drain(drain_seconds()):
            return lines
        self.queue.close()  # what it still holds, a replay sends
        pending = {record.trial_id for record in self.queue.pending() if record.trial_id}
        folders = {trial_id_of(str(trial)): str(trial) for trial in table.get("trial", [])}
        self.incomplete = IncompleteRuns(sorted(folders.get(t, t) for t in pending),
                                         clock(self.queue.away_since or time.time()),
                                         replay_command(self.study_dir, self.uri))
        return self.incomplete.lines(self.uri)

    def _end_study(self, table, metric: str, mode: str, register_as: str | None, interrupted: bool, finals: dict,
                   out: list[str]) -> None:
        errors = list(self.queue.errors)
        if interrupted:
            self.kill_unfinished()
        parent, lines = self.parent_run_id(), []
        best = best_trial_id(table, metric)
        if best is not None:
            trial_id, value = best
            found = self.find_run(trial_id)
            best_run = found.info.run_id if found else ""
            self.client.set_tag(parent, BEST_TRIAL_TAG, trial_id)
            self.client.set_tag(parent, BEST_RUN_TAG, best_run)
            if self.client.get_run(parent).data.metrics.get(f"best/{metric}") != value:  # once, across resumes
                self.client.log_metric(parent, f"best/{metric}", value)
            checkpoint, config = finals.get(trial_id, (None, None))
            if best_run and checkpoint is not None and self.log_models != "none":
                try:
                    with checkpoint.as_directory() as folder:
                        epochs = table.loc[table["trial"].str.endswith(trial_id), "epoch"]
                        self._log_model(best_run, self.experiment_id(), Path(folder), int(epochs.iloc[0]), config)
                except Exception as err:  # noqa: BLE001 - the results stand; the missing model is said
                    if not (refused(err) or answers(self.uri)):
                        raise  # the server went away: the queue waits for it and tries again
                    errors.append(err)
            model_id = logged_model_id(self.client, self.experiment_id(), best_run, MODEL_DIR, ready_only=True) \
                if best_run else None
            if register_as and model_id:
                version = register(self.client, register_as, model_id, best_run, self.uri)
                lines.append(f"registered: model {register_as!r} version {version} (trial {trial_id}, "
                             f"runs:/{best_run}/{MODEL_DIR})")
            elif register_as:
                lines.append(f"registered: nothing; the best trial {trial_id} logged no model")
        if errors:  # the results are complete; say which MLflow records are not, rather than exit as if they were
            lines.append(f"MLflow: {len(errors)} record(s) could not be logged: uploads of checkpoints or models, or "
                         f"epochs (the first: {str(errors[0]).strip().splitlines()[-1][:300]}); the study's run is "
                         "marked FAILED")
        status = "KILLED" if interrupted else "FAILED" if errors or best is None else "FINISHED"
        self.client.set_terminated(parent, status=status)
        out[:] = lines

    def ui_lines(self) -> list[str]:
        """How to open the study's runs: the command that serves the UI (sqlite), and the runs view's URL."""
        if "experiment" not in self._ids and self.incomplete is not None:  # the server is away: ask it nothing
            return [f"MLflow UI: {self.uri} (experiment {self.experiment!r})"]
        command = ui_command(self.uri)
        url = runs_url(self.uri, self.experiment_id())
        return [f"MLflow UI: {command}", f"           then open {url}"] if command else [f"MLflow UI: {url}"]

    def kill_unfinished(self, status: str = "KILLED") -> int:
        """After an interrupted study, close the trials' runs still RUNNING as KILLED (MLflow's status for a run
        that was stopped); a resume finds them again by tag and sets them RUNNING. Returns how many."""
        parent = self.parent_run_id()
        found = all_runs(self.client, self.experiment_id(), "attributes.status = 'RUNNING'")
        # this study's trials only: another study of the same name (another storage folder) may be running now;
        # a run without a parent was logged before studies had one, so it is this study's
        killed = [run.info.run_id for run in found if TRIAL_TAG in run.data.tags
                  and run.data.tags.get("mlflow.parentRunId", parent) == parent]
        for run_id in killed:
            self.client.set_terminated(run_id, status=status)
        self._runs.clear()
        return len(killed)

    def abandon(self, status: str) -> None:
        """The study ended by an error (FAILED) or a second signal (KILLED): close its open runs, parent included,
        with that status rather than leave them RUNNING (after the records queued before; a resume reopens them)."""
        self.queue.submit(None, f"closing the study's runs as {status}", self._abandon, status)
        if not self.queue.drain(drain_seconds()):
            self.queue.close()

    def _abandon(self, status: str) -> None:
        self.kill_unfinished(status)
        if "parent" in self._ids:
            self.client.set_terminated(self._ids["parent"], status=status)
