"""The one runner: every study is ``run_study(name, BASE, SPACE, metric, mode)``.

It owns the CLI, Ray and MLflow set-up, the checks that must fail before any trial starts, the only
``Tuner``, resume, and the end-of-study table. Ray is imported here and in ``trainables/tune_io.py`` only.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from studies.cli import apply_args, build_parser
from studies.errors import StudyInterrupted, cli_errors, flag_for_config_error
from studies.interrupts import stop_signals
from studies.preflight import (KEEP_CHECKPOINTS, Autoscaler, PendingClock, PendingTimeoutError,  # noqa: F401
                               ResourceError, StorageError, check_data, check_disk, check_resources, check_weights,
                               learn, pending_timeout_message, trial_count)
from studies.record import (applied_changes, check_resume, definition, invocation, now, read_record, resume_command,
                            snapshot_statuses, updated, write_file)
from studies.space import check_space, is_grid, largest_state, merge_space, sample_seed, seed_samples, variants
from studies.study_run import parent_params
from studies.tracking import StudyTracker, check_reachable, flatten, resolve_uri
from studies.validate import check_args
from trainables import ConfigError, Finding, TrainConfig, trainable_for
from trainables.finding import judge
from trainables.naming import flatten as flat_config
from trainables.naming import varied_keys
from trainables.tune_state import outcome

log = logging.getLogger("vision_tune")
SUMMARY_KEYS = ("train/loss", "val/loss", "val/accuracy", "val/precision", "val/recall", "val/miou",
                "val/recon", "val/kl", "val/elbo", "epoch")
# num_to_keep forces an experiment snapshot every KEEP_CHECKPOINTS reports, and Tune warns of a bottleneck at
# every study: measured at ~20 ms of the driver's loop per snapshot (benchmarks/tune_overhead.py), it is not one
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


class MLflowCallback(tune.Callback):
    """Runs on the driver: one MLflow run per trial, nested in the study's (see ``studies/tracking.py``);
    uploads of final checkpoints and models run on the tracker's upload thread, off Tune's event loop."""

    def __init__(self, tracker: StudyTracker) -> None:
        self.tracker = tracker

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.tracker.start(trial.trial_id, str(trial), trial.config)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.tracker.start(trial.trial_id, str(trial), trial.config)  # no-op unless restored mid-trial
        self.tracker.log_result(trial.trial_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        checkpoint = trial.checkpoint.as_directory() if trial.checkpoint is not None else None
        self.tracker.finish(trial.trial_id, "FINISHED", checkpoint=checkpoint)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        error = Path(trial.error_file).read_text() if trial.error_file and Path(trial.error_file).exists() else None
        self.tracker.finish(trial.trial_id, "FAILED", error=error)


class KeepResultsOnRetry(tune.Callback):
    """No epoch lost when a trial is retried: Tune 2.60 restarts a failed trial by copying its result.json back
    from storage, where the copy lags the driver's own by up to one experiment snapshot, so the epochs reported
    since that snapshot would vanish from Tune's results. Push the driver's copy to storage first."""

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        from pyarrow import fs

        local = Path(trial.local_path, "result.json")
        if local.is_file():
            fs.copy_files(str(local), f"{trial.storage.trial_fs_path}/result.json",
                          destination_filesystem=trial.storage.storage_filesystem)


class PendingTimeout(tune.Callback):
    """Ends the study with the request and what the cluster offered when trials have waited --pending-timeout
    seconds with none running: Tune itself waits forever for a node that no autoscaler delivers."""

    def __init__(self, args) -> None:
        self.clock, self.cpus, self.gpus = PendingClock(args.pending_timeout), args.cpus_per_trial, args.gpus_per_trial

    def on_step_begin(self, iteration, trials, **info) -> None:
        now = time.monotonic()
        pending = self.clock.expired([trial.status for trial in trials], now)
        if pending:
            raise PendingTimeoutError(pending_timeout_message(pending, self.cpus, self.gpus, self.clock.timeout,
                                                              ray.nodes(), autoscaler()))
        if self.clock.note_due(now):
            scaler = autoscaler()
            log.warning("no trial running for %.0f s, waiting for a node: %s", now - self.clock.since,
                        scaler.describe() if scaler else "no autoscaler runs")


def autoscaler() -> Autoscaler | None:
    """What Ray publishes about this cluster's autoscaler (see studies/autoscaling.py); Ray has no public API
    for it, so these are the calls `ray status` and Ray Data make."""
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray._private.state import state
    from ray.experimental.internal_kv import _internal_kv_get

    groups = node_groups(state.get_cluster_config())  # autoscaler v2's node groups; None under the v1 monitor
    return learn(_internal_kv_get(DEBUG_AUTOSCALING_STATUS), groups, now=time.time())


def node_groups(config) -> dict | None:
    """Ray's ``autoscaler_pb2.ClusterConfig`` as the plain dict ``studies.autoscaling`` reads."""
    if config is None:
        return None
    return {"node_group_configs": [{"name": group.name, "resources": dict(group.resources),
                                    "max_count": group.max_count} for group in config.node_group_configs]}


def trial_dirname(trial) -> str:
    """Short trial folders: Tune's default spells out every sampled parameter and overflows paths."""
    return f"{trial.trainable_name}_{trial.trial_id}"


def to_choices(space: dict) -> dict:
    """Optuna samples and cannot take Tune's grid: each grid becomes a choice over the same values."""
    return {key: tune.choice(value["grid_search"]) if is_grid(value)
            else to_choices(value) if isinstance(value, dict) else value for key, value in space.items()}


class SeededOptunaSearch(OptunaSearch):
    """Optuna whose n-th proposed trial trains with ``sample_seed(base_seed, n)``: every trial its own seed,
    the same sequence for the same command. The counter is pickled with the searcher's state (OptunaSearch
    saves its ``__dict__``), so a resumed study continues the sequence instead of repeating it."""

    def __init__(self, base_seed: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self._base_seed, self._suggested = base_seed, 0

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        if isinstance(config, dict):  # not None (wait) nor Searcher.FINISHED
            config = {**config, "seed": sample_seed(self._base_seed, self._suggested)}
            self._suggested += 1
        return config


def study_variants(base: TrainConfig, space: dict, search: str) -> tuple[list[dict], list[str] | None]:
    """The study's variants as flat configs in Tune's trial order (its own grid generator), which letter the
    runs as the analysis does; a sampled search has no variants up front, only the keys that vary."""
    if search == "optuna":
        return [], varied_keys(flat_config(v) for v in variants(base, space))
    from ray.tune.search.variant_generator import generate_variants

    return [flat_config(v) for _, v in generate_variants(merge_space(base.to_dict(), space))], None


def _trainable(base: TrainConfig, args):
    return tune.with_resources(trainable_for(base), {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})


def _start_ray(address: str | None) -> bool:
    """Join or start Ray; returns whether this call started it (and so should stop it)."""
    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False, configure_logging=True, logging_level=logging.WARNING)
    return True


def _make_tuner(name: str, base: TrainConfig, space: dict, metric: str, mode: str, args, storage: str,
                tracker: StudyTracker, default_samples: int | None):
    trainable = _trainable(base, args)
    param_space = merge_space(base.to_dict(), space)
    search_alg, samples = None, (args.num_samples or 1)
    if args.search == "optuna":
        param_space = to_choices(param_space)
        search_alg = SeededOptunaSearch(base.seed, seed=base.seed)
        samples = trial_count(args, space, default_samples)
    else:
        param_space, samples = seed_samples(param_space, base.seed, samples)
    scheduler = None
    if args.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=base.epochs, grace_period=1,
                                  reduction_factor=2)
    run_config = tune.RunConfig(
        name=name, storage_path=storage, verbose=1,
        callbacks=[MLflowCallback(tracker), KeepResultsOnRetry(), PendingTimeout(args)],
        failure_config=tune.FailureConfig(max_failures=args.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS))
    # reuse_actors: a fresh worker per trial costs ~2 s of imports
    tune_config = tune.TuneConfig(metric=metric, mode=mode, num_samples=samples, search_alg=search_alg,
                                  scheduler=scheduler, max_concurrent_trials=args.max_concurrent,
                                  reuse_actors=True, trial_dirname_creator=trial_dirname)
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def summarize(results, metric: str, mode: str, statuses: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per trial: the hyperparameters that vary, status, final metrics; best first. ``statuses`` (Tune's
    snapshot, after an interruption) tells finished trials from the ones a stop cut short."""
    rows = []
    for result in results:
        config = flatten(result.config or {})
        folder = Path(result.path).name
        epochs_run = int((result.metrics or {}).get("training_iteration") or 0)
        status = outcome(None if statuses is None else statuses.get(folder, ""), bool(result.error), epochs_run)
        row = {"trial": folder, "status": status,
               **{f"config/{k}": v for k, v in config.items()},
               **{k: (result.metrics or {}).get(k) for k in SUMMARY_KEYS}}
        if result.error:
            row["error"] = str(result.error).strip().splitlines()[-1][:2000]
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    # finished trials first, by the metric: an interrupted trial's last epoch is not its result
    keys = ["unfinished", *([metric] if metric in table else [])]
    table = table.assign(unfinished=table["status"].ne("OK")).sort_values(
        keys, ascending=[True, mode == "min"][:len(keys)], na_position="last", kind="stable")
    table = table.drop(columns="unfinished")
    return table.dropna(axis=1, how="all").reset_index(drop=True)


def varied_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c.startswith("config/") and table[c].nunique(dropna=False) > 1]


def run_study(name: str, base: TrainConfig, space: dict, metric: str, mode: str, *,
              argv: list[str] | None = None, num_samples: int | None = None, doc: str | None = None,
              default_args: list[str] | None = None, finding: Finding | None = None) -> pd.DataFrame:
    """Run (or resume) study ``name``: BASE + SPACE as trials on Ray Tune, logged to MLflow.

    ``default_args`` are the study's own defaults for CLI flags (e.g. Optuna + ASHA); the user's flags win.
    ``finding`` is the report's claim the study tests: judged at the end, printed and written to finding.json.
    Called from a script (``argv`` left to ``sys.argv``), errors end the process with one line and an exit
    code (``studies/errors.py``); called with ``argv``, they raise (an interruption as ``StudyInterrupted``).
    """
    if argv is not None:
        return _run(name, base, space, metric, mode, argv, num_samples, doc, default_args, [f"studies/{name}.py"],
                    finding)
    with cli_errors(sys.argv[1:]):
        return _run(name, base, space, metric, mode, sys.argv[1:], num_samples, doc, default_args, sys.argv[:1], finding)


def _run(name: str, base: TrainConfig, space: dict, metric: str, mode: str, argv: list[str],
         num_samples: int | None, doc: str | None, default_args: list[str] | None, script: list[str],
         finding: Finding | None) -> pd.DataFrame:
    args = build_parser(name, doc).parse_args([*(default_args or []), *argv])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_args(args)  # every flag's range, and --address/--storage/--mlflow-uri usable: before anything starts
    try:
        base, space = apply_args(base, space, args)
        check_space(base, space)  # unknown keys and invalid values fail here, before Ray starts
    except ConfigError as err:
        raise ConfigError(flag_for_config_error(err, vars(args))) from None
    local = "://" not in args.storage
    storage = str(Path(args.storage).expanduser().resolve()) if local else args.storage
    study_dir = f"{storage}/{name}"
    study = definition(name, base, space, metric, mode, args, trial_count(args, space, num_samples))
    study["finding"] = finding.to_dict() if finding else None  # what analysis judges the study against
    recorded = read_record(study_dir)
    uri = resolve_uri(args.mlflow_uri)
    if args.resume:
        check_resume(recorded, study, study_dir)
        if not tune.Tuner.can_restore(study_dir):
            raise FileNotFoundError(f"--resume: no Tune state to resume in {study_dir} (the study stopped before "
                                    "its first snapshot); start it again with --overwrite")
        uri = uri if args.mlflow_uri else recorded.get("mlflow_uri") or uri  # the study's own, unless moved
        if recorded.get("state") == "finished":
            log.info("%s had finished: --resume reruns nothing and prints its table again", study_dir)
    elif recorded is not None and not args.overwrite:
        raise FileExistsError(f"--storage {args.storage}: {study_dir} already holds a study: pass --resume to "
                              "continue it, --overwrite to start over, or another --storage")
    check_reachable(uri)
    check_data(base)
    check_weights(base, space)  # found or downloaded once here, before Ray: trials only read the cache
    if not args.resume:
        check_disk(largest_state(base, space), study["trials"], storage, uri)
        if args.overwrite and local and Path(study_dir).exists():
            shutil.rmtree(study_dir)  # only now: a refused command must not have cost the old study
    entry = invocation(args, uri, [*script, *argv])
    if args.resume:
        entry["applied"] = applied_changes(recorded, entry)
        for change in entry["applied"]:
            log.info("resume applies %s", change)
    fresh = not args.resume and not (local and Path(study_dir).exists())
    record: dict = {}
    tracker = StudyTracker(uri, name, {"vision_tune.study": name})
    tracker.plan(study_dir, parent_params(base.to_dict(), [sys.argv[0], *argv], metric, mode),
                 *study_variants(base, space, args.search))
    tracker.warm_up()  # MLflow's import and store set-up overlap Ray's start and the first workers' imports

    with stop_signals() as stop:
        started = _start_ray(args.address)
        stop.install()  # after ray.init, whose C++ handler would turn SIGTERM into an abort
        try:
            waiting = check_resources(ray.nodes(), args.cpus_per_trial, args.gpus_per_trial, autoscaler(),
                                      args.pending_timeout)
            if waiting:
                log.warning(waiting)
            if args.resume:
                tuner = tune.Tuner.restore(study_dir, trainable=_trainable(base, args))
                _apply_on_resume(tuner, tracker, args)
            else:
                tuner = _make_tuner(name, base, space, metric, mode, args, storage, tracker, num_samples)
            record = updated(recorded, study, entry)
            write_file(f"{study_dir}/study.json", json.dumps(record, indent=2, default=str))
            with stop.fitting():
                results = tuner.fit()
        except BaseException as err:
            # a second signal (Tune did not get to stop the trials) or an error: no run is left RUNNING
            _quietly(tracker.abandon, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            if not _after_failure(study_dir, fresh and local, err) and entry in record.get("invocations", []):
                state = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
                entry.update(state=state, ended=now(), error=str(err)[:500])
                write_file(f"{study_dir}/study.json", json.dumps({**record, "state": state}, indent=2, default=str))
            raise
        finally:
            if started:
                ray.shutdown()
    statuses = snapshot_statuses(study_dir) if stop.signum else None
    table = summarize(results, metric, mode, statuses)
    write_file(f"{study_dir}/trials.csv", table.to_csv(index=False))
    entry.update(state="interrupted" if stop.signum else "finished", ended=now())
    record["state"] = entry["state"]
    write_file(f"{study_dir}/study.json", json.dumps(record, indent=2, default=str))
    mlflow_lines = tracker.end_study(table, metric, mode, None if stop.signum else args.register_model,
                                     interrupted=bool(stop.signum))
    _print_summary(table, name, study_dir, uri, metric, study["trials"], tracker.ui_lines() + mlflow_lines)
    if finding is not None and not table.empty:
        _report_finding(finding, table, study_dir)
    if stop.signum:
        raise StudyInterrupted(stop.signum, resume_command(entry["argv"]), table)
    return table


def _report_finding(finding: Finding, table: pd.DataFrame, study_dir: str) -> None:
    """The report's claim judged on this study's trials: printed, and kept as finding.json for analysis."""
    verdict = judge(finding, table)
    write_file(f"{study_dir}/finding.json", json.dumps(verdict.to_dict(), indent=2, default=str))
    print(f"\n{verdict.text()}\nfinding: {study_dir}/finding.json")


def _apply_on_resume(tuner, tracker: StudyTracker, args) -> None:
    """What a resume honours: Tune keeps the first run's callbacks and failure config in its pickled state,
    so the new MLflow URI, retries and resources are put into the restored run config (Tuner has no public
    setter; ``_local_tuner`` is where ``fit`` reads them)."""
    run_config = tuner._local_tuner.get_run_config()
    run_config.callbacks = [MLflowCallback(tracker) if isinstance(c, MLflowCallback) else c
                            for c in run_config.callbacks or [] if not isinstance(c, ApplyOnResume)]
    run_config.callbacks.append(ApplyOnResume(args.cpus_per_trial, args.gpus_per_trial, args.max_failures))
    run_config.failure_config = tune.FailureConfig(max_failures=args.max_failures)


class ApplyOnResume(tune.Callback):
    """Trials restored from the snapshot keep the resources and retry budget they were created with, and so do
    the ones the restored search algorithm creates later (its pickled spec holds the first run's max_failures;
    their resources come from the re-registered trainable): give every unfinished trial the new --max-failures,
    and the ones not placed yet the new --cpus-per-trial / --gpus-per-trial."""

    def __init__(self, cpus: float, gpus: float, max_failures: int) -> None:
        self.resources = {"CPU": cpus, "GPU": gpus}
        self.max_failures = max_failures

    def on_step_begin(self, iteration, trials, **info) -> None:
        wanted = {kind: amount for kind, amount in self.resources.items() if amount}
        for trial in trials:
            if trial.status in ("PENDING", "PAUSED", "RUNNING"):  # read only when a trial fails: safe to change
                trial.max_failures = self.max_failures
            if trial.status in ("PENDING", "PAUSED") and trial.placement_group_factory.required_resources != wanted:
                trial.update_resources({"cpu": self.resources["CPU"], "gpu": self.resources["GPU"]})


def _quietly(work, *args) -> None:
    """Best-effort clean-up on the way out of a failure: its own error must not hide the one being raised."""
    try:
        work(*args)
    except Exception:  # noqa: BLE001
        log.debug("clean-up failed", exc_info=True)


def _after_failure(study_dir: str, fresh_local: bool, err: BaseException) -> bool:
    """A start that failed before any trial reported leaves no folder that would block the corrected command;
    returns whether it removed the folder."""
    if fresh_local and not isinstance(err, StudyInterrupted) and not any(Path(study_dir).glob("*/result.json")):
        shutil.rmtree(study_dir, ignore_errors=True)
        return True
    return False


def _print_summary(table: pd.DataFrame, name: str, study_dir: str, uri: str, metric: str, expected: int,
                   mlflow_lines: list[str]) -> None:
    shown = ["trial", "status", *varied_columns(table), *[k for k in SUMMARY_KEYS if k in table.columns]]
    unfinished = len(table[table["status"].isin(("INTERRUPTED", "NOT_STARTED"))]) + max(0, expected - len(table))
    state = f", INCOMPLETE: {unfinished} of {max(expected, len(table))} unfinished" if unfinished else ""
    print(f"\n=== {name}: {len(table)} trial(s){state}, sorted by {metric} ===")
    print(table[shown].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for _, failed in table[table["status"] == "ERROR"].iterrows():
        print(f"ERROR {failed['trial']}: {failed.get('error', '')[:400]}")
    if expected > len(table):  # Tune creates a grid's trials as slots free up: the rest were never created
        print(f"({expected - len(table)} more trial(s) not created yet: the resume runs them)")
    print(f"\ntable: {study_dir}/trials.csv")
    best = table[table["status"] == "OK"]
    if not best.empty:
        print("best config" + (" among the finished trials so far" if state else "") + ":",
              {k[len("config/"):]: v for k, v in best.iloc[0].items() if k.startswith("config/")})
    for line in mlflow_lines:  # the UI command and the URL of the study's runs (model-training view)
        print(line)
    if not uri.startswith("sqlite:"):
        print("           (the tracking server; see README, 'Run on a cluster', for port forwarding)")
    print(f"report:    python -m analysis {study_dir} --mlflow-uri {uri}")
