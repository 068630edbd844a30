"""The driver's only Ray code: starting Ray, the Tuner (search algorithm, scheduler, callbacks), its restore,
and what the cluster and its autoscaler offer. Trials' own Ray code is ``trainables/tune_io.py``.

Tune pickles the callbacks, ``trial_dirname`` and the search algorithm by module path into each study's snapshot;
``studies.runner`` re-exports them under their old names, so studies written before this module existed resume.
"""
from __future__ import annotations

import logging
import os
import re
import time

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, HyperBandScheduler, PopulationBasedTraining
from ray.tune.search.optuna import OptunaSearch

from analysis.naming import VariantNames
from analysis.naming import flatten as flat_config
from analysis.naming import varied_keys
from analysis.ray_internals import (autoscaling_status, cluster_config, copy_result_to_storage, restored_run_config,
                                    set_trial_retries, trial_resources)
from studies.runner.autoscaling import Autoscaler
from studies.runner.cli import pbt_interval
from studies.runner.console import Console
from studies.runner.preflight import (KEEP_CHECKPOINTS, PendingClock, PendingTimeoutError, learn,
                                      pending_timeout_message, trial_count)
from studies.runner.space import continuous_grids, is_grid, merge_space, sample_seed, seed_samples, variants
from studies.runner.tracking import StudyTracker
from trainables import TrainConfig, trainable_for

log = logging.getLogger("vision_tune")
UNSAFE = re.compile(r"[^A-Za-z0-9.=+-]+")  # what a trial's folder name keeps of its label
# num_to_keep forces an experiment snapshot every KEEP_CHECKPOINTS reports, and Tune warns of a bottleneck at
# every study: measured at ~20 ms of the driver's loop per snapshot (benchmarks/tune_overhead.py), it is not one
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


class MLflowCallback(tune.Callback):
    """Runs on the driver: one MLflow run per trial, nested in the study's (see ``tracking.py``). It only queues:
    the tracker's thread sends the records, so a slow or absent tracking server never holds Tune's loop (and the
    trials, whose reports wait for it)."""

    def __init__(self, tracker: StudyTracker) -> None:
        self.tracker = tracker

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.tracker.trial_started(trial.trial_id, str(trial), trial.config)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.tracker.trial_started(trial.trial_id, str(trial), trial.config)  # no-op unless restored mid-trial
        self.tracker.trial_result(trial.trial_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.tracker.trial_ended(trial.trial_id, "FINISHED", checkpoint=trial.checkpoint, config=trial.config)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.tracker.trial_ended(trial.trial_id, "FAILED", error_file=trial.error_file)


class ConsoleCallback(tune.Callback):
    """Feeds the study's console (``console.py``) from Tune's events; Tune's own table shows with --verbose."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.console.started_trial(trial.trial_id, trial.config)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.console.result(trial.trial_id, trial.config, result)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.console.ended(trial.trial_id, trial.config, "DONE")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.console.ended(trial.trial_id, trial.config, "ERROR")

    def on_step_begin(self, iteration, trials, **info) -> None:
        self.console.tick()

    def on_experiment_end(self, trials, **info) -> None:
        self.console.close()


class KeepResultsOnRetry(tune.Callback):
    """No epoch lost when a trial restarts: Tune 2.60 restarts a trial (retried after a failure, or resumed after
    HyperBand or PBT paused it) by copying its result.json back from storage, where the copy lags the driver's own
    by up to one experiment snapshot, so the epochs reported since would vanish from Tune's results. Push the
    driver's copy to storage first (this callback runs before Tune's own loggers)."""

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        copy_result_to_storage(trial)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        copy_result_to_storage(trial)  # a first start has no copy yet: nothing to push


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
                set_trial_retries(trial, self.max_failures)
            if trial.status in ("PENDING", "PAUSED") and trial_resources(trial) != wanted:
                trial.update_resources({"cpu": self.resources["CPU"], "gpu": self.resources["GPU"]})


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


def trial_dirname(trial) -> str:
    """Trial folders of studies written before ``TrialNamer`` (their snapshots name this function)."""
    return f"{trial.trainable_name}_{trial.trial_id}"


class TrialNamer:
    """A trial's name and folder: its variant's letter and short label, as its MLflow run, the console and the
    report call it, made a file name, then Tune's trial id, which keeps it unique (a variant's seeds) and which the
    analysis reads back: ``C_adam_lr=0.001_3bdc3_00002``. Tune's default spells out every parameter instead."""

    def __init__(self, names: VariantNames) -> None:
        self.names = names

    def __call__(self, trial) -> str:
        label = UNSAFE.sub("_", self.names.run_name(flat_config(trial.config))).strip("_")
        return f"{label[:60]}_{trial.trial_id}"


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


def autoscaler() -> Autoscaler | None:
    """What Ray publishes about this cluster's autoscaler (see ``autoscaling.py``); Ray has no public API for
    it, so these are the calls `ray status` and Ray Data make (``analysis/ray_internals.py``)."""
    return learn(autoscaling_status(), cluster_config(), now=time.time())


def start_ray(address: str | None, env_vars: dict[str, str] | None = None, worker_logs: bool = True) -> bool:
    """Join or start Ray; returns whether this call started it (and so should stop it). ``env_vars`` reach every
    trial through the job's runtime_env (S3 settings for nodes whose own environment lacks them)."""
    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": env_vars} if env_vars else None
    ray.init(address=address, include_dashboard=False, configure_logging=True, logging_level=logging.WARNING,
             runtime_env=runtime_env, log_to_driver=worker_logs)
    return True


def stop_ray() -> None:
    ray.shutdown()


def cluster_nodes() -> list[dict]:
    """The cluster's nodes as ``ray.nodes()`` describes them (the pre-flight reads plain dicts)."""
    return ray.nodes()


def trainable(base: TrainConfig, args, weights: list | None = None):
    """The task's trainable with the per-trial resources (custom ones too: --resources-per-trial) and, for nodes
    that share no disk with the driver, its pretrained weights files in Ray's object store."""
    function = tune.with_parameters(trainable_for(base), weights=weights) if weights else trainable_for(base)
    return tune.with_resources(function, {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial,
                                          **getattr(args, "extra_resources", {})})


def make_tuner(name: str, base: TrainConfig, space: dict, goals: list[tuple[str, str]], args, storage: str,
               tracker: StudyTracker, default_samples: int | None, weights: list | None = None,
               console: Console | None = None) -> tune.Tuner:
    """The study's Tuner: BASE + SPACE as Tune's param space, the search and scheduler the flags chose; two
    ``goals`` (metric, mode) make Optuna's search multi-objective, and Tune's own metric unset."""
    (metric, mode), pareto = goals[0], len(goals) == 2
    param_space = merge_space(base.to_dict(), space)
    search_alg, samples = None, (args.num_samples or 1)
    if args.search == "optuna":
        param_space = to_choices(param_space)
        search_alg = SeededOptunaSearch(base.seed, seed=base.seed, **({"metric": [m for m, _ in goals],
                                                                        "mode": [d for _, d in goals]} if pareto else {}))
        samples = trial_count(args, space, default_samples)
    else:
        param_space, samples = seed_samples(param_space, base.seed, samples)
    scheduler, keep = None, KEEP_CHECKPOINTS
    if args.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=base.epochs, grace_period=1,
                                  reduction_factor=2)
    elif args.scheduler == "hyperband":  # pauses trials: each resumes from its checkpoint of that epoch
        scheduler = HyperBandScheduler(time_attr="training_iteration", max_t=base.epochs, reduction_factor=3)
    elif args.scheduler == "pbt":
        # synchronous: the whole population meets at each perturbation (trials pause, from their checkpoints);
        # with fewer slots than trials, asynchronous PBT compares a trial only with the few running beside it
        scheduler = PopulationBasedTraining(time_attr="training_iteration",
                                            perturbation_interval=pbt_interval(args, base.epochs),
                                            hyperparam_mutations=continuous_grids(space), synch=True)
        keep = 4  # other trials copy a checkpoint after it is superseded (Tune warns below 3)
    shown = [ConsoleCallback(console)] if console is not None else []
    run_config = tune.RunConfig(
        name=name, storage_path=storage, verbose=0 if console is not None else 1,
        callbacks=[MLflowCallback(tracker), KeepResultsOnRetry(), PendingTimeout(args), *shown],
        failure_config=tune.FailureConfig(max_failures=args.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=keep))
    # reuse_actors: a fresh worker per trial costs ~2 s of imports
    tune_config = tune.TuneConfig(metric=None if pareto else metric, mode=None if pareto else mode,
                                  num_samples=samples, search_alg=search_alg,
                                  scheduler=scheduler, max_concurrent_trials=args.max_concurrent,
                                  reuse_actors=True, trial_dirname_creator=TrialNamer(tracker.names),
                                  trial_name_creator=TrialNamer(tracker.names))
    return tune.Tuner(trainable(base, args, weights), param_space=param_space, tune_config=tune_config,
                      run_config=run_config)


def can_restore(study_dir: str) -> bool:
    return tune.Tuner.can_restore(study_dir)


def restore_tuner(study_dir: str, base: TrainConfig, args, tracker: StudyTracker,
                  weights: list | None = None, console: Console | None = None) -> tune.Tuner:
    """The study's Tuner from its snapshot, with what a resume honours put into the restored run config: Tune
    keeps the first run's callbacks and failure config in its pickled state, so the new MLflow URI, retries and
    resources go in here (Tuner has no public setter: ``restored_run_config``)."""
    tuner = tune.Tuner.restore(study_dir, trainable=trainable(base, args, weights))
    run_config = restored_run_config(tuner)
    run_config.callbacks = [MLflowCallback(tracker) if isinstance(c, MLflowCallback) else c
                            for c in run_config.callbacks or [] if not isinstance(c, (ApplyOnResume, ConsoleCallback))]
    run_config.callbacks.append(ApplyOnResume(args.cpus_per_trial, args.gpus_per_trial, args.max_failures))
    if console is not None:
        run_config.callbacks.append(ConsoleCallback(console))
    run_config.verbose = 0 if console is not None else 1
    run_config.failure_config = tune.FailureConfig(max_failures=args.max_failures)
    return tuner
