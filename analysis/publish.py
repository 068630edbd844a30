"""The report in MLflow: uploaded to the study's parent run (the run its trials' runs nest under).

Rebuilding a report logs into the same run again, so the experiment keeps one parent and no sibling report
run; a study tracked elsewhere gets its parent run created here, named after the study.
"""
from __future__ import annotations

from pathlib import Path

from analysis.mlflow_store import experiment_id, find_or_create_parent, open_client, runs_url

REPORT_TAG = "vision_tune.report"


def log_report(uri: str, experiment: str, folder: Path, study_dir: str, tags: dict | None = None) -> tuple[str, str]:
    """Upload ``folder`` as ``report/`` of the parent run of the study in ``study_dir``; returns (run id, URL of
    the study's runs)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # relative: to the cwd, as the runner
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    client = open_client(uri)
    experiment_id_ = experiment_id(client, uri, experiment)
    run_id = find_or_create_parent(client, experiment_id_, experiment, study_dir, any_folder=True)
    for key, value in {REPORT_TAG: "true", **(tags or {})}.items():
        client.set_tag(run_id, key, value)
    client.log_artifacts(run_id, str(folder), artifact_path="report")
    if client.get_run(run_id).info.status == "RUNNING" and not client.search_runs(
            [experiment_id_], f"tags.`mlflow.parentRunId` = '{run_id}' AND attributes.status = 'RUNNING'",
            max_results=1):
        client.set_terminated(run_id, status="FINISHED")  # a parent created here: nothing else will close it
    return run_id, runs_url(uri, experiment_id_)
