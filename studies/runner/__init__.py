"""The one runner: every study is ``run_study(name, BASE, SPACE, metric, mode)``.

This module tells a study's story: validate the command line, pre-flight, build (or restore) the tuner, fit,
record, summarise. Each step lives in its own module: ``cli`` and ``validate`` (flags), ``errors`` (how the
command fails), ``preflight`` (checks before any trial), ``tuner`` (the driver's only Ray code), ``tracking``
(MLflow), ``record`` (study.json and resume), ``interrupts`` (Ctrl-C, SIGTERM), ``summary`` (the end).
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pandas as pd

from studies.runner import legacy
from studies.runner.cli import apply_args, build_parser, objectives
from studies.runner.console import Console
from studies.runner.errors import (StudyInterrupted, TrackingIncomplete, TrialsFailed, UsageError, cli_errors,
                                   flag_for_config_error, redact)
from studies.runner.interrupts import stop_signals
from studies.runner.mlflow_runs import parent_params
from studies.runner.mlflow_uri import check_reachable, resolve_uri
from studies.runner.preflight import (check_data, check_disk, check_resources, check_weights, shipped_weights,
                                      study_bytes, trial_count)
from studies.runner.record import (applied_changes, check_start, definition, invocation, now, read_record,
                                   remove_failed_start, resume_command, snapshot_statuses, updated, write_file)
from studies.runner.space import check_space, continuous_grids, largest_state
from studies.runner.storage import remove_study, study_exists, trial_env
from studies.runner.summary import failed_trials, print_summary, report_finding, summarize
from studies.runner.tracking import StudyTracker
from studies.runner.tuner import (ApplyOnResume, KeepResultsOnRetry, MLflowCallback, PendingTimeout,  # noqa: F401
                                  SeededOptunaSearch, autoscaler, can_restore, cluster_nodes, make_tuner,
                                  restore_tuner, start_ray, stop_ray, study_variants, trial_dirname)
from studies.runner.validate import check_args
from analysis.finding import Finding
from trainables import ConfigError, TrainConfig

log = logging.getLogger("vision_tune")
legacy.install()  # snapshots written before the runner was a package name its modules by their old paths


def run_study(name: str, base: TrainConfig, space: dict, metric: str, mode: str, *,
              argv: list[str] | None = None, num_samples: int | None = None, doc: str | None = None,
              default_args: list[str] | None = None, finding: Finding | None = None) -> pd.DataFrame:
    """Run (or resume) study ``name``: BASE + SPACE as trials on Ray Tune, logged to MLflow.

    ``default_args`` are the study's own defaults for CLI flags (e.g. Optuna + ASHA); the user's flags win.
    ``finding`` is the report's claim the study tests: judged at the end, printed and written to finding.json.
    Called from a script (``argv`` left to ``sys.argv``), errors end the process with a message and an exit
    code (``errors.py``; 3 when trials failed); called with ``argv``, they raise (an interruption as
    ``StudyInterrupted``) and failed trials are rows of the returned table.
    """
    if argv is not None:
        return _run(name, base, space, metric, mode, argv, num_samples, doc, default_args, [f"studies/{name}.py"],
                    finding)
    with cli_errors(sys.argv[1:]):
        table = _run(name, base, space, metric, mode, sys.argv[1:], num_samples, doc, default_args, sys.argv[:1],
                     finding)
        if failed_trials(table):
            raise TrialsFailed(failed_trials(table), len(table), table.attrs["study_dir"])
        if table.attrs.get("incomplete") is not None:
            raise TrackingIncomplete(table.attrs["incomplete"].trials, table.attrs["incomplete"].command)
        return table


def _run(name: str, base: TrainConfig, space: dict, metric: str, mode: str, argv: list[str],
         num_samples: int | None, doc: str | None, default_args: list[str] | None, script: list[str],
         finding: Finding | None) -> pd.DataFrame:
    args = build_parser(name, doc).parse_args([*(default_args or []), *argv])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_args(args)  # every flag's range, and --address/--storage/--mlflow-uri usable: before anything starts
    goals = objectives(args, metric, mode)
    (metric, mode), args.search = goals[0], "optuna" if len(goals) == 2 else args.search  # two: Optuna's Pareto search
    try:
        base, space = apply_args(base, space, args)
        check_space(base, space)  # unknown keys and invalid values fail here, before Ray starts
    except ConfigError as err:
        raise ConfigError(flag_for_config_error(err, vars(args))) from None
    if args.scheduler == "pbt" and not continuous_grids(space):
        raise UsageError("--scheduler pbt: this study's space has no grid of real numbers to perturb (PBT moves "
                         "values such as learning rates); use --scheduler asha or hyperband")
    local = "://" not in args.storage
    storage = str(Path(args.storage).expanduser().resolve()) if local else args.storage
    study_dir = f"{storage}/{name}"
    study = definition(name, base, space, metric, mode, args, trial_count(args, space, num_samples))
    study["finding"] = finding.to_dict() if finding else None  # what analysis judges the study against
    study["objectives"] = [list(goal) for goal in goals]
    study["question"] = (doc or "").strip().split("\n\n")[0].replace("\n", " ")  # the index page's (not defining)
    recorded = read_record(study_dir)
    uri = check_start(args, recorded, study, study_dir, resolve_uri(args.mlflow_uri))
    if args.resume and not can_restore(study_dir):
        raise FileNotFoundError(f"--resume: no Tune state to resume in {study_dir} (the study stopped before its "
                                "first snapshot); start it again with --overwrite")
    check_reachable(uri)
    check_data(base)
    weights = shipped_weights(check_weights(base, space), args.address)  # found or downloaded once, here
    if not args.resume:
        check_disk(*study_bytes(*largest_state(base, space), study["trials"], base.epochs, base.checkpoint_every,
                                args.log_models), study["trials"], storage, uri)
        if args.overwrite and study_exists(study_dir):
            remove_study(study_dir)  # only now: a refused command must not have cost the old study (S3 too)
    entry = invocation(args, uri, [*script, *argv])
    if args.resume:
        entry["applied"] = applied_changes(recorded, entry)
        for change in entry["applied"]:
            log.info("resume applies %s", change)
    fresh = not args.resume and not study_exists(study_dir)
    record: dict = {}
    tracker = StudyTracker(uri, name, {"vision_tune.study": name})
    tracker.plan(study_dir, parent_params(base.to_dict(), [redact(a) for a in (sys.argv[0], *argv)], metric, mode),
                 *study_variants(base, space, args.search), task=base.TASK, log_models=args.log_models)
    tracker.warm_up()  # MLflow's import and store set-up overlap Ray's start and the first workers' imports
    console = None if args.verbose else Console(tracker.names, metric, mode, study["trials"], base.epochs)

    with stop_signals() as stop:
        started = start_ray(args.address, trial_env(args.storage) if args.address else None, args.verbose)
        stop.install()  # after ray.init, whose C++ handler would turn SIGTERM into an abort
        try:
            waiting = check_resources(cluster_nodes(), args.cpus_per_trial, args.gpus_per_trial, autoscaler(),
                                      args.pending_timeout, args.extra_resources)
            if waiting:
                log.warning(waiting)
            if args.resume:
                tuner = restore_tuner(study_dir, base, args, tracker, weights, console)
            else:
                tuner = make_tuner(name, base, space, goals, args, storage, tracker, num_samples, weights, console)
            record = updated(recorded, study, entry)
            write_file(f"{study_dir}/study.json", json.dumps(record, indent=2, default=str))
            with stop.fitting():
                results = tuner.fit()
        except BaseException as err:
            # a second signal (Tune did not get to stop the trials) or an error: no run is left RUNNING
            _quietly(tracker.abandon, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            if not remove_failed_start(study_dir, fresh, err) and entry in record.get("invocations", []):
                state = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
                entry.update(state=state, ended=now(), error=str(err)[:500])
                write_file(f"{study_dir}/study.json", json.dumps({**record, "state": state}, indent=2, default=str))
            raise
        finally:
            if started:
                stop_ray()
    statuses = snapshot_statuses(study_dir) if stop.signum else None
    table = summarize(results, metric, mode, statuses, tracker.names,
                      {tid: line.name for tid, line in console.lines.items()} if console else None)
    table.attrs["study_dir"] = study_dir
    write_file(f"{study_dir}/trials.csv", table.to_csv(index=False))
    failed = len(failed_trials(table))
    entry.update(state="interrupted" if stop.signum else "finished", ended=now(),
                 **({"failed_trials": failed} if failed else {}))
    record["state"] = entry["state"]
    write_file(f"{study_dir}/study.json", json.dumps(record, indent=2, default=str))
    finals = {r.metrics.get("trial_id"): (r.checkpoint, r.config) for r in results if r.checkpoint and r.metrics}
    mlflow_lines = tracker.end_study(table, metric, mode, None if stop.signum else args.register_model,
                                     interrupted=bool(stop.signum), finals=finals)
    table.attrs["incomplete"] = tracker.incomplete  # MLflow stayed away: the runs it lacks, their replay
    print_summary(table, name, study_dir, uri, metric, study["trials"], tracker.ui_lines() + mlflow_lines, goals)
    if finding is not None and not table.empty:
        report_finding(finding, table, study_dir, mixed=args.scheduler == "pbt")
    if stop.signum:
        raise StudyInterrupted(stop.signum, resume_command(entry["argv"]), table)
    return table


def _quietly(work, *args) -> None:
    """Best-effort clean-up on the way out of a failure: its own error must not hide the one being raised."""
    try:
        work(*args)
    except Exception:  # noqa: BLE001
        log.debug("clean-up failed", exc_info=True)

