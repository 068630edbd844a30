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
from pathlib import Path

import pandas as pd
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from studies.cli import apply_args, build_parser
from studies.preflight import (KEEP_CHECKPOINTS, ResourceError, StorageError, check_data, check_disk,  # noqa: F401
                               check_resources, trial_count)
from studies.space import check_space, is_grid, largest_state, merge_space, variants
from studies.study_run import parent_params
from studies.tracking import StudyTracker, check_reachable, flatten, resolve_uri
from trainables import TrainConfig, trainable_for
from trainables.naming import flatten as flat_config
from trainables.naming import varied_keys

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


def trial_dirname(trial) -> str:
    """Short trial folders: Tune's default spells out every sampled parameter and overflows paths."""
    return f"{trial.trainable_name}_{trial.trial_id}"


def to_choices(space: dict) -> dict:
    """Optuna samples and cannot take Tune's grid: each grid becomes a choice over the same values."""
    return {key: tune.choice(value["grid_search"]) if is_grid(value)
            else to_choices(value) if isinstance(value, dict) else value for key, value in space.items()}


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
        search_alg = OptunaSearch(seed=base.seed)
        samples = trial_count(args, space, default_samples)
    scheduler = None
    if args.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=base.epochs, grace_period=1,
                                  reduction_factor=2)
    run_config = tune.RunConfig(
        name=name, storage_path=storage, callbacks=[MLflowCallback(tracker), KeepResultsOnRetry()], verbose=1,
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
              default_args: list[str] | None = None) -> pd.DataFrame:
    """Run (or resume) study ``name``: BASE + SPACE as trials on Ray Tune, logged to MLflow.

    ``default_args`` are the study's own defaults for CLI flags (e.g. Optuna + ASHA); the user's flags win.
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
    if not args.resume:
        check_disk(largest_state(base, space), trial_count(args, space, num_samples), storage, uri)
    tracker = StudyTracker(uri, name, {"vision_tune.study": name})
    tracker.plan(study_dir, parent_params(base.to_dict(), [sys.argv[0], *argv], metric, mode),
                 *study_variants(base, space, args.search))
    tracker.warm_up()  # MLflow's import and store set-up overlap Ray's start and the first workers' imports

    started = _start_ray(args.address)
    try:
        check_resources(ray.nodes(), args.cpus_per_trial, args.gpus_per_trial)
        if args.resume:
            if not tune.Tuner.can_restore(study_dir):
                raise FileNotFoundError(f"--resume: no study to resume in {study_dir}")
            tuner = tune.Tuner.restore(study_dir, trainable=_trainable(base, args))
        else:
            tuner = _make_tuner(name, base, space, metric, mode, args, storage, tracker, num_samples)
        write_file(f"{study_dir}/study.json", json.dumps(
            {"name": name, "task": base.TASK, "metric": metric, "mode": mode, "mlflow_uri": uri,
             "base": base.to_dict(), "argv": sys.argv}, indent=2, default=str))
        results = tuner.fit()
    finally:
        if started:
            ray.shutdown()
    table = summarize(results, metric, mode)
    write_file(f"{study_dir}/trials.csv", table.to_csv(index=False))
    mlflow_lines = tracker.end_study(table, metric, mode, args.register_model)
    _print_summary(table, name, study_dir, uri, metric, tracker.ui_lines() + mlflow_lines)
    return table


def write_file(path: str, text: str) -> None:
    """Write beside Tune's results, on a local disk or in S3/GCS alike (pyarrow, as Tune itself)."""
    from pyarrow import fs

    filesystem, fs_path = fs.FileSystem.from_uri(path if "://" in path else Path(path).resolve().as_uri())
    filesystem.create_dir(fs_path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(fs_path) as stream:
        stream.write(text.encode())


def _print_summary(table: pd.DataFrame, name: str, study_dir: str, uri: str, metric: str,
                   mlflow_lines: list[str]) -> None:
    shown = ["trial", "status", *varied_columns(table), *[k for k in SUMMARY_KEYS if k in table.columns]]
    print(f"\n=== {name}: {len(table)} trial(s), sorted by {metric} ===")
    print(table[shown].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for _, failed in table[table["status"] == "ERROR"].iterrows():
        print(f"ERROR {failed['trial']}: {failed.get('error', '')[:400]}")
    print(f"\ntable: {study_dir}/trials.csv")
    best = table[table["status"] == "OK"]
    if not best.empty:
        print("best config:", {k[len("config/"):]: v for k, v in best.iloc[0].items() if k.startswith("config/")})
    for line in mlflow_lines:  # the UI command and the URL of the study's runs (model-training view)
        print(line)
    if not uri.startswith("sqlite:"):
        print("           (the tracking server; see README, 'Run on a cluster', for port forwarding)")
    print(f"report:    python -m analysis {study_dir} --mlflow-uri {uri}")
