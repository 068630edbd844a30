"""A study's own MLflow run (the parent of its trials' runs), its best model's registration, and the small helpers
the tracker and the replay share (runs read page by page, configs as params, reported numbers as metrics).

The parent is found again by its tag, so retries, ``--resume`` and a rebuilt report reuse it; within one
driver a lock makes find-or-create atomic (after a resume the restored callback's tracker and the runner's
both ask for it).
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

from analysis.naming import flatten as flat_config

log = logging.getLogger(__name__)
BEST_TRIAL_TAG, BEST_RUN_TAG = "vision_tune.best_trial", "vision_tune.best_run"
TRIAL_ID = re.compile(r"(?:[0-9a-f]{5}_\d{5}|[0-9a-f]{8})$")  # Tune's: a grid's <experiment>_<index>, a searcher's


def flatten(config: dict) -> dict[str, str]:
    """Nested config -> {"optim/lr": "0.001", ...}, as MLflow params (strings)."""
    return {key: str(value) for key, value in flat_config(config).items()}


def numeric_metrics(result: dict) -> dict[str, float]:
    """The reported numbers worth a curve: every finite number except Tune's bookkeeping."""
    skip = {"timestamp", "pid", "done", "training_iteration", "time_since_restore", "iterations_since_restore",
            "time_this_iter_s", "time_total_s"}
    return {key: float(value) for key, value in result.items()
            if key not in skip and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(float(value))}


def all_runs(client, experiment_id: str, filter_string: str = "") -> list:
    """Every run of the experiment that matches, page by page (one call returns at most 1,000)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


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
