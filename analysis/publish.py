"""The report in MLflow: one run named "report" in the study's experiment, the report folder as artifacts.

Rebuilding a report logs into the same run again (found by its tag), so the experiment keeps one report run.
"""
from __future__ import annotations

from pathlib import Path

REPORT_TAG = "vision_tune.report"


def log_report(uri: str, experiment: str, folder: Path, tags: dict | None = None) -> str:
    """Upload ``folder`` into the experiment's "report" run (created when missing); returns the run id."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # relative: to the cwd, as the runner
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:  # a study tracked elsewhere: keep its artifacts beside a sqlite database, as the runner
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / experiment).as_uri()
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    else:
        experiment_id = found.experiment_id
    runs = client.search_runs([experiment_id], f"tags.`{REPORT_TAG}` = 'true'", max_results=1)
    if runs:
        run_id = runs[0].info.run_id
    else:
        run_id = client.create_run(experiment_id, run_name="report",
                                   tags={REPORT_TAG: "true", "vision_tune.study": experiment}).info.run_id
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    client.log_artifacts(run_id, str(folder), artifact_path="report")
    client.set_terminated(run_id, status="FINISHED")
    return run_id
