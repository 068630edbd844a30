"""Send a study's results to MLflow: what its runs lack of the epochs its trials reported, their final artifacts and
their end, then the study's own run (best trial, best model, status).

Tune's results (each trial's result.json in the study folder, local or s3://) hold every epoch, so they are the
durable copy of what the driver queues for MLflow: a driver that died, or a tracking server that never came back
before the study ended, loses nothing. Idempotent: runs are found again by their tag, epochs already logged are
skipped, a run already complete is left alone; the runs it creates are named, tagged and given params by the
tracker's own methods, as the driver would have.

    python -m studies.runner.replay results/vae_lr                      # to the study's --mlflow-uri (study.json)
    python -m studies.runner.replay s3://studies/vt/vae_lr --mlflow-uri http://head:5000
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import socket
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from analysis.mlflow_store import PARENT_TAG, STUDY_DIR_TAG
from analysis.naming import flatten, varied_keys
from studies.runner.cli import build_parser
from studies.runner.mlflow_runs import BEST_TRIAL_TAG, best_trial_id, parent_params, trial_id_of
from studies.runner.mlflow_uri import check_reachable, resolve_uri
from studies.runner.record import read_record, snapshot_statuses
from studies.runner.tracking import STEP_METRIC, StudyTracker
from trainables.checkpoints import ARTIFACTS

CHECKPOINT = re.compile(r"checkpoint_(\d+)$")
# the trials table's status -> the run's; Tune's snapshot status (a study whose driver died) -> the run's
RUN_STATUS = {"OK": "FINISHED", "ERROR": "FAILED", "INTERRUPTED": "KILLED"}
SNAPSHOT_STATUS = {"TERMINATED": "FINISHED", "ERROR": "FAILED", "RUNNING": "KILLED", "PAUSED": "KILLED",
                   "PENDING": "KILLED"}


class StudyFiles:
    """The study folder through pyarrow, as Tune wrote it: a local folder or an s3:// (gs://) URI."""

    def __init__(self, study_dir: str) -> None:
        from pyarrow import fs

        self.study_dir = study_dir
        self.fs, self.root = fs.FileSystem.from_uri(study_dir if "://" in study_dir else Path(study_dir).as_uri())
        self.local = isinstance(self.fs, fs.LocalFileSystem)

    def text(self, relative: str) -> str | None:
        from pyarrow import fs

        path = f"{self.root}/{relative}"
        if self.fs.get_file_info(path).type != fs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as stream:
            return stream.read().decode()

    def listing(self, relative: str = "") -> list:
        from pyarrow import fs

        selector = fs.FileSelector(f"{self.root}/{relative}".rstrip("/"), allow_not_found=True)
        return self.fs.get_file_info(selector)

    def trials(self) -> list[str]:
        """Trial folders (those with params.json), in Tune's trial order (their index)."""
        from pyarrow import fs

        folders = [info.base_name for info in self.listing() if info.type == fs.FileType.Directory]
        return sorted(f for f in folders if self.text(f"{f}/params.json") is not None)

    def results(self, trial: str) -> list[dict]:
        """The trial's reports, as result.json holds them (a line cut by a crash mid-write skipped)."""
        rows = []
        for line in (self.text(f"{trial}/result.json") or "").splitlines():
            if line.strip():
                with contextlib.suppress(json.JSONDecodeError):
                    rows.append(json.loads(line))
        return rows

    def final_checkpoint(self, trial: str) -> "FinalCheckpoint | None":
        found = [(int(m.group(1)), info.base_name) for info in self.listing(trial)
                 if (m := CHECKPOINT.search(info.base_name))]
        return FinalCheckpoint(self, f"{trial}/{max(found)[1]}") if found else None


class FinalCheckpoint:
    """A trial's last checkpoint, with ``tune.Checkpoint``'s ``as_directory()``: the folder itself on a local disk,
    else a temporary copy of it."""

    def __init__(self, files: StudyFiles, relative: str) -> None:
        self.files, self.relative = files, relative

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[str]:
        from pyarrow import fs

        source = f"{self.files.root}/{self.relative}"
        if self.files.local:
            yield source
            return
        with tempfile.TemporaryDirectory(prefix="vt-replay-") as tmp:
            fs.copy_files(source, tmp, source_filesystem=self.files.fs, destination_filesystem=fs.LocalFileSystem())
            yield tmp


def study_tracker(record: dict, study_dir: str, uri: str, trial_configs: list[dict]) -> tuple[StudyTracker, str | None]:
    """The tracker as the study's driver built it: experiment, tags, parent params and run names (from the trials'
    configs in Tune's order, which is the grid's; a sampled search's letters follow the trials' order); and the
    model name its command registers (--register-model)."""
    argv = list(record.get("argv") or ["study"])
    flags = build_parser(record["name"]).parse_known_args(argv[1:])[0]
    tracker = StudyTracker(uri, record["name"], {"vision_tune.study": record["name"]})
    flat = [flatten(config) for config in trial_configs]
    variants, varied = ([], varied_keys(flat)) if record.get("search") == "optuna" else (flat, None)
    tracker.plan(study_dir, parent_params(record.get("base", {}), argv, record["metric"], record["mode"]), variants,
                 varied, task=record.get("task", ""), log_models=flags.log_models)
    return tracker, flags.register_model


def trials_table(files: StudyFiles):
    """trials.csv, or None when the study never wrote it (its driver died, or it failed)."""
    import pandas as pd

    text = files.text("trials.csv")
    return pd.read_csv(io.StringIO(text)) if text else None


def replay_trial(tracker: StudyTracker, files: StudyFiles, trial: str, config: dict, status: str | None) -> int | None:
    """One trial's run completed from its results; returns the epochs logged, None when it was complete."""
    results = files.results(trial)
    key = str(results[0].get("trial_id") or trial_id_of(trial)) if results else trial_id_of(trial)
    last = max((int(r.get(STEP_METRIC, r.get("training_iteration", 0))) for r in results), default=0)
    run = tracker.find_run(key)
    if run is not None and run.info.status == (status or "RUNNING") and run.data.metrics.get(STEP_METRIC, 0) >= last:
        return None
    if run is None and not results and status is None:
        return None  # never started: its driver would hold no run for it either
    tracker.start(key, trial, config)
    before = tracker.logged_epoch(key)
    for result in results:
        tracker.log_result(key, result)
    logged = tracker.logged_epoch(key) - before
    if status is not None:
        checkpoint = files.final_checkpoint(trial) if status == "FINISHED" else None
        if checkpoint is not None and run is not None and tracker.client.list_artifacts(run.info.run_id, ARTIFACTS):
            checkpoint = None  # its artifacts reached MLflow before the server went away
        tracker.finish(key, status, checkpoint=checkpoint, error=files.text(f"{trial}/error.txt"), config=config)
    return logged


def replay(files: StudyFiles, record: dict, uri: str) -> tuple[list[str], bool]:
    """Send what MLflow lacks; returns the lines to print and whether everything was sent."""
    trials = files.trials()
    configs = {trial: json.loads(files.text(f"{trial}/params.json") or "{}") for trial in trials}
    tracker, register_as = study_tracker(record, files.study_dir, uri, [configs[t] for t in trials])
    table, state = trials_table(files), record.get("state")
    if table is not None:
        statuses = {row["trial"]: RUN_STATUS.get(row["status"]) for _, row in table.iterrows()}
    else:
        statuses = {t: SNAPSHOT_STATUS.get(s) for t, s in snapshot_statuses(files.study_dir).items()}
    done = [replay_trial(tracker, files, trial, configs[trial], statuses.get(trial)) for trial in trials]
    completed = [logged for logged in done if logged is not None]
    lines = [f"replayed into {uri}: {len(completed)} trial run(s) completed ({sum(completed)} epoch(s) logged), "
             f"{len(done) - len(completed)} already complete"]
    ended = state in ("finished", "interrupted") and table is not None
    expected = ("KILLED" if state == "interrupted" else None) if ended else "FAILED" if state == "failed" else "KILLED"
    if not completed and parent_closed(tracker, expected):
        return [*lines, "the study's run was complete too: nothing to replay"], True
    if not ended:  # as its driver would have on the way out; a --resume reopens the runs
        tracker.parent_run_id()
        tracker.abandon(expected)
        tracker.queue.close()
        return [*lines, f"the study's run closed as {expected} (the study is {state})"], True
    best = best_trial_id(table, record["metric"])
    folders = {trial_id_of(t): t for t in trials}
    checkpoint = files.final_checkpoint(folders[best[0]]) if best and best[0] in folders else None
    finals = {best[0]: (checkpoint, configs[folders[best[0]]])} if checkpoint else {}
    lines += tracker.end_study(table, record["metric"], record["mode"], register_as if state == "finished" else None,
                               interrupted=state == "interrupted", finals=finals)
    tracker.queue.close()
    return lines, tracker.incomplete is None


def parent_closed(tracker: StudyTracker, status: str | None) -> bool:
    """Whether the study's run is closed as its end left it (``status``; None: FINISHED or FAILED, with the best
    trial recorded when there was one)."""
    found = tracker.client.search_runs([tracker.experiment_id()], f"tags.`{PARENT_TAG}` = 'true' AND "
                                       f"tags.`{STUDY_DIR_TAG}` = '{tracker.study_dir}'", max_results=1)
    if not found:
        return False
    run = found[0]
    if status is not None:
        return run.info.status == status
    return run.info.status in ("FINISHED", "FAILED") and (BEST_TRIAL_TAG in run.data.tags
                                                         or run.info.status == "FAILED")


def still_running(record: dict) -> int | None:
    """The pid of the study's driver when it runs on this machine now (it sends its own records)."""
    last = (record.get("invocations") or [{}])[-1]
    if record.get("state") != "running" or last.get("host") != socket.gethostname() or not last.get("pid"):
        return None
    try:
        os.kill(int(last["pid"]), 0)
    except (OSError, ValueError):
        return None
    return int(last["pid"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.runner.replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study_dir", help="the study's folder: <storage>/<name>, local or s3://")
    parser.add_argument("--mlflow-uri", help="default: the study's own (study.json's mlflow_uri)")
    args = parser.parse_args(argv)
    study_dir = args.study_dir.rstrip("/") if "://" in args.study_dir else str(Path(args.study_dir).expanduser()
                                                                               .resolve())
    try:
        record = read_record(study_dir)
        if record is None:
            raise FileNotFoundError(f"{study_dir} is not a study folder: study.json is missing")
        pid = still_running(record)
        if pid is not None:
            raise RuntimeError(f"the study in {study_dir} is running (driver pid {pid}): its driver sends its records")
        uri = resolve_uri(args.mlflow_uri or record.get("mlflow_uri"))
        check_reachable(uri)
        lines, complete = replay(StudyFiles(study_dir), record, uri)
    except Exception as err:  # noqa: BLE001 - the command line's last word
        print(f"error: {type(err).__name__}: {str(err).strip()[:2000]}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
