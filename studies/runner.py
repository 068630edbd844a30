"""The one runner: every study is ``run_study(name, BASE, SPACE, metric, mode)``.

It owns the CLI, Ray and MLflow set-up, the checks that must fail before any trial starts, the only
``Tuner``, resume, and the end-of-study table. Ray is imported here and in ``trainables/tune_io.py`` only.
"""
from __future__ import annotations

import json
import logging
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
from studies.preflight import (KEEP_CHECKPOINTS, Autoscaler, PendingClock, PendingTimeoutError,  # noqa: F401
                               ResourceError, StorageError, check_data, check_disk, check_resources, check_weights,
                               learn, pending_timeout_message, trial_count)
from studies.space import check_space, is_grid, largest_state, merge_space, sample_seed, seed_samples
from studies.tracking import StudyTracker, check_reachable, flatten, resolve_uri
from trainables import Finding, TrainConfig, trainable_for
from trainables.finding import judge

log = logging.getLogger("vision_tune")
SUMMARY_KEYS = ("train/loss", "val/loss", "val/accuracy", "val/precision", "val/recall", "val/miou",
                "val/recon", "val/kl", "val/elbo", "epoch")
class MLflowCallback(tune.Callback):
    """Runs on the driver: one MLflow run per trial (see ``studies/tracking.py``)."""

    def __init__(self, tracker: StudyTracker) -> None:
        self.tracker = tracker

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.tracker.start(trial.trial_id, str(trial), trial.config)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.tracker.start(trial.trial_id, str(trial), trial.config)  # no-op unless restored mid-trial
        self.tracker.log_result(trial.trial_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if trial.checkpoint is None:
            self.tracker.finish(trial.trial_id, "FINISHED")
            return
        with trial.checkpoint.as_directory() as folder:
            self.tracker.finish(trial.trial_id, "FINISHED", artifacts_dir=folder)

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


def summarize(results, metric: str, mode: str) -> pd.DataFrame:
    """One row per trial: the hyperparameters that vary, status, final metrics; best first."""
    rows = []
    for result in results:
        config = flatten(result.config or {})
        row = {"trial": Path(result.path).name, "status": "ERROR" if result.error else "OK",
               **{f"config/{k}": v for k, v in config.items()},
               **{k: (result.metrics or {}).get(k) for k in SUMMARY_KEYS}}
        if result.error:
            row["error"] = str(result.error).strip().splitlines()[-1][:2000]
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table = table.sort_values(metric, ascending=(mode == "min"), na_position="last", kind="stable")
    return table.dropna(axis=1, how="all").reset_index(drop=True)


def varied_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c.startswith("config/") and table[c].nunique(dropna=False) > 1]


def run_study(name: str, base: TrainConfig, space: dict, metric: str, mode: str, *,
              argv: list[str] | None = None, num_samples: int | None = None, doc: str | None = None,
              default_args: list[str] | None = None, finding: Finding | None = None) -> pd.DataFrame:
    """Run (or resume) study ``name``: BASE + SPACE as trials on Ray Tune, logged to MLflow.

    ``default_args`` are the study's own defaults for CLI flags (e.g. Optuna + ASHA); the user's flags win.
    ``finding`` is the report's claim the study tests: judged at the end, printed and written to finding.json.
    """
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(name, doc).parse_args([*(default_args or []), *argv])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    base, space = apply_args(base, space, args)
    check_space(base, space)  # unknown keys and invalid values fail here, before Ray starts
    uri = resolve_uri(args.mlflow_uri)
    check_reachable(uri)
    local = "://" not in args.storage
    storage = str(Path(args.storage).expanduser().resolve()) if local else args.storage
    study_dir = f"{storage}/{name}"
    if not args.resume and local and Path(study_dir).exists():
        if not args.overwrite:
            raise FileExistsError(f"{study_dir} already holds a study: pass --resume to continue it, "
                                  "--overwrite to start over, or another --storage")
        shutil.rmtree(study_dir)
    check_data(base)
    check_weights(base, space)  # found or downloaded once here, before Ray: trials only read the cache
    if not args.resume:
        check_disk(largest_state(base, space), trial_count(args, space, num_samples), storage, uri)
    tracker = StudyTracker(uri, name, {"vision_tune.study": name})
    tracker.warm_up()  # MLflow's import and store set-up overlap Ray's start and the first workers' imports

    started = _start_ray(args.address)
    try:
        waiting = check_resources(ray.nodes(), args.cpus_per_trial, args.gpus_per_trial, autoscaler(),
                                  args.pending_timeout)
        if waiting:
            log.warning(waiting)
        if args.resume:
            if not tune.Tuner.can_restore(study_dir):
                raise FileNotFoundError(f"--resume: no study to resume in {study_dir}")
            tuner = tune.Tuner.restore(study_dir, trainable=_trainable(base, args))
        else:
            tuner = _make_tuner(name, base, space, metric, mode, args, storage, tracker, num_samples)
        write_file(f"{study_dir}/study.json", json.dumps(
            {"name": name, "task": base.TASK, "metric": metric, "mode": mode, "mlflow_uri": uri,
             "base": base.to_dict(), "argv": sys.argv, "finding": finding.to_dict() if finding else None},
            indent=2, default=str))
        results = tuner.fit()
    finally:
        if started:
            ray.shutdown()
    table = summarize(results, metric, mode)
    write_file(f"{study_dir}/trials.csv", table.to_csv(index=False))
    _print_summary(table, name, study_dir, uri, metric)
    if finding is not None and not table.empty:
        _report_finding(finding, table, study_dir)
    return table


def _report_finding(finding: Finding, table: pd.DataFrame, study_dir: str) -> None:
    """The report's claim judged on this study's trials: printed, and kept as finding.json for analysis."""
    verdict = judge(finding, table)
    write_file(f"{study_dir}/finding.json", json.dumps(verdict.to_dict(), indent=2, default=str))
    print(f"\n{verdict.text()}\nfinding: {study_dir}/finding.json")


def write_file(path: str, text: str) -> None:
    """Write beside Tune's results, on a local disk or in S3/GCS alike (pyarrow, as Tune itself)."""
    from pyarrow import fs

    filesystem, fs_path = fs.FileSystem.from_uri(path if "://" in path else Path(path).resolve().as_uri())
    filesystem.create_dir(fs_path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(fs_path) as stream:
        stream.write(text.encode())


def _print_summary(table: pd.DataFrame, name: str, study_dir: str, uri: str, metric: str) -> None:
    shown = ["trial", "status", *varied_columns(table), *[k for k in SUMMARY_KEYS if k in table.columns]]
    print(f"\n=== {name}: {len(table)} trial(s), sorted by {metric} ===")
    print(table[shown].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for _, failed in table[table["status"] == "ERROR"].iterrows():
        print(f"ERROR {failed['trial']}: {failed.get('error', '')[:400]}")
    print(f"\ntable: {study_dir}/trials.csv")
    best = table[table["status"] == "OK"]
    if not best.empty:
        print("best config:", {k[len("config/"):]: v for k, v in best.iloc[0].items() if k.startswith("config/")})
    if uri.startswith("sqlite:"):
        print(f"MLflow UI: mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri {uri}")
    else:
        print(f"MLflow UI: {uri} (the tracking server; see README, 'Run on a cluster', for port forwarding)")
    print(f"report:    python -m analysis {study_dir} --mlflow-uri {uri}")
