"""What does a study through our runner cost over the same training in a plain process pool?

N trials of the VAE on embedded mnist5k (our trainable, per-epoch checkpoints, end-of-trial artifacts),
each calibrated to about T seconds of training, run four ways with the same parallelism:
  (a) ours:   run_study (Ray Tune, reuse_actors, MLflow on sqlite, CheckpointConfig(num_to_keep=2))
  (b) pool:   ProcessPoolExecutor (spawn: workers import torch as Ray's do) calling run_trial with a
              LocalSession -- the limit
  (c) optuna: optuna's study.optimize(n_jobs=P), which runs trials in *threads* of one process;
              run_trial sets torch to 1 intra-op thread per trial, so P threads use P cores
  (d) plain:  a Tuner with Tune's defaults (fresh worker per trial, keep every checkpoint, no MLflow)
Every wall time is divided by (b)'s from the same round; Ray's start (ray.init + shutdown) is timed apart.
Ray runs its workers at niceness 15; the pool's workers and Optuna's trial threads get the same (--nice),
so that on a shared machine other users' load slows every way alike.

    python benchmarks/tune_overhead.py                      # 8 trials at ~2 s and ~7 s (about 5 minutes)
    python benchmarks/tune_overhead.py --lengths 2 7 30 --repeats 2
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from common import table, write_json

WAYS = ("pool", "ours", "optuna", "plain")  # (b) first: every ratio divides by it


def vae_config(root: str, steps: int, epochs: int, seed: int = 0) -> dict:
    """The trial: a small fixed VAE workload; only the seed differs between trials."""
    from trainables import VAEConfig

    return VAEConfig(dataset="mnist5k", image_size=28, batch_size=64, epochs=epochs, steps_per_epoch=steps,
                     val_samples=128, feature_samples=64, seed=seed, data_root=root).to_dict()


def local_trial(config: dict, out_dir: str) -> tuple[float, float]:
    """One trial without Ray (the pool's and Optuna's body); returns its seconds and val/loss."""
    from trainables.tune_io import LocalSession, run_trial
    from trainables.vae import TASK

    start = time.perf_counter()
    metrics = run_trial(config, TASK, LocalSession(out_dir, cpus=1))
    return time.perf_counter() - start, metrics["val/loss"]


def calibrate(root: str, epochs: int, lengths: list[float]) -> dict[float, int]:
    """steps_per_epoch per target length, from a fixed-cost run (1 step) and a 12-step run, in this process."""
    tmp = tempfile.mkdtemp(prefix="vt-cal-")
    local_trial(vae_config(root, 1, epochs), f"{tmp}/warm")  # data cache, first-call costs
    fixed = min(local_trial(vae_config(root, 1, epochs), f"{tmp}/f{i}")[0] for i in range(2))
    longer = local_trial(vae_config(root, 12, epochs), f"{tmp}/l")[0]
    per_step = max((longer - fixed) / (11 * epochs), 1e-4)
    shutil.rmtree(tmp, ignore_errors=True)
    logging.info("calibration: fixed %.2f s per trial, %.1f ms per step", fixed, per_step * 1e3)
    return {t: max(1, round((t - fixed) / (epochs * per_step)) + 1) for t in lengths}


NICE = 15  # Ray's default worker niceness (RAY_worker_niceness); --nice changes it for pool and Optuna


def _lower_priority(nice: int) -> None:
    """This thread (Linux: a thread is a task with its own niceness) at ``nice``, as Ray runs its workers."""
    current = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if nice > current:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def run_pool(configs: list[dict], workers: int, tmp: Path) -> dict:
    start = time.perf_counter()
    with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                initializer=_lower_priority, initargs=(NICE,)) as pool:
        times = list(pool.map(local_trial, configs, [str(tmp / f"t{i}") for i in range(len(configs))]))
    return {"wall_s": time.perf_counter() - start, "trial_s": [t for t, _ in times]}


def run_optuna(configs: list[dict], workers: int, tmp: Path) -> dict:
    import optuna
    import torch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    threads = torch.get_num_threads()
    times = []

    def objective(trial) -> float:
        _lower_priority(NICE)  # optuna's worker threads end with optimize(): the driver keeps its own
        seconds, loss = local_trial(configs[trial.number], str(tmp / f"t{trial.number}"))
        times.append(seconds)
        return loss

    start = time.perf_counter()
    optuna.create_study(direction="minimize").optimize(objective, n_trials=len(configs), n_jobs=workers)
    wall = time.perf_counter() - start
    torch.set_num_threads(threads)  # run_trial set 1 thread for this whole process
    return {"wall_s": wall, "trial_s": times}


def _with_ray(workers: int, body) -> dict:
    """Time ray.init and ray.shutdown apart from the body."""
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, configure_logging=True, logging_level=logging.WARNING)
    ray_start = time.perf_counter() - start
    try:
        result = body()
    finally:
        stop = time.perf_counter()
        ray.shutdown()
        ray_stop = time.perf_counter() - stop
    return {**result, "ray_start_s": ray_start + ray_stop}


def run_ours(configs: list[dict], workers: int, tmp: Path) -> dict:
    from ray import tune

    from studies.runner import run_study
    from trainables import VAEConfig

    base = VAEConfig.from_dict(configs[0])
    space = {"seed": tune.grid_search([c["seed"] for c in configs])}
    argv = ["--storage", str(tmp / "storage"), "--mlflow-uri", f"sqlite:///{tmp}/mlflow.db",
            "--cpus-per-trial", "1", "--max-concurrent", str(workers)]

    def body():
        start = time.perf_counter()
        summary = run_study("bench_ours", base, space, metric="val/loss", mode="min", argv=argv)
        wall = time.perf_counter() - start
        ok = int((summary["status"] == "OK").sum())
        return {"wall_s": wall, "trials_ok": ok, **_checkpoint_facts(tmp / "storage" / "bench_ours"),
                "mlflow_runs": _mlflow_runs(f"sqlite:///{tmp}/mlflow.db")}

    return _with_ray(workers, body)


def run_plain(configs: list[dict], workers: int, tmp: Path) -> dict:
    from ray import tune

    from trainables import train_vae

    space = {**configs[0], "seed": tune.grid_search([c["seed"] for c in configs])}

    def body():
        start = time.perf_counter()
        tuner = tune.Tuner(tune.with_resources(train_vae, {"cpu": 1}), param_space=space,
                           tune_config=tune.TuneConfig(metric="val/loss", mode="min"),
                           run_config=tune.RunConfig(name="bench_plain", storage_path=str(tmp / "storage")))
        results = tuner.fit()
        return {"wall_s": time.perf_counter() - start, "trials_ok": sum(not r.error for r in results),
                "trial_s": [r.metrics.get("time_total_s") for r in results]}

    return _with_ray(workers, body)


def _checkpoint_facts(study_dir: Path) -> dict:
    kept = sorted(study_dir.glob("*/checkpoint_*"))
    return {"checkpoints_kept": len(kept), "checkpoint_mb": round(sum(
        f.stat().st_size for c in kept for f in c.rglob("*") if f.is_file()) / max(len(kept), 1) / 2**20, 2)}


def _mlflow_runs(uri: str) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("bench_ours")
    return len(client.search_runs([experiment.experiment_id])) if experiment else 0


RUNNERS = {"pool": run_pool, "ours": run_ours, "optuna": run_optuna, "plain": run_plain}


def main() -> None:
    global NICE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=float, nargs="+", default=[2.0, 7.0], help="seconds of training per trial")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="trials at once (pool workers, Optuna n_jobs, CPUs)")
    parser.add_argument("--epochs", type=int, default=4, help="reports and checkpoints per trial")
    parser.add_argument("--repeats", type=int, default=1, help="rounds per length; odd rounds run in reverse order")
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=WAYS)
    parser.add_argument("--nice", type=int, default=NICE, help="niceness of pool workers and Optuna threads")
    args = parser.parse_args()
    NICE = args.nice
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    ways = ["pool", *[w for w in args.ways if w != "pool"]]
    root = tempfile.mkdtemp(prefix="vt-data-")
    steps = calibrate(root, args.epochs, args.lengths)
    rows, raw = [], []
    for length in args.lengths:
        configs = [vae_config(root, steps[length], args.epochs, seed) for seed in range(args.trials)]
        sums: dict[str, dict] = {w: {"wall_s": 0.0, "ray_start_s": 0.0, "trial_s": []} for w in ways}
        for round_ in range(args.repeats):
            for way in (ways if round_ % 2 == 0 else ways[::-1]):  # ABBA: drift in the load cancels
                tmp = Path(tempfile.mkdtemp(prefix=f"vt-{way}-"))
                logging.info("--- %s, ~%g s trials, round %d", way, length, round_ + 1)
                result = RUNNERS[way](configs, args.workers, tmp)
                shutil.rmtree(tmp, ignore_errors=True)
                raw.append({"length": length, "way": way, "round": round_, "steps_per_epoch": steps[length],
                            **result})
                sums[way]["wall_s"] += result["wall_s"]
                sums[way]["ray_start_s"] += result.get("ray_start_s", 0.0)
                sums[way]["trial_s"] += [t for t in result.get("trial_s", []) if t]
        pool = sums["pool"]["wall_s"]
        for way in ways:
            wall, ray_start = sums[way]["wall_s"], sums[way]["ray_start_s"]
            trial_s = sums["pool"]["trial_s"]
            rows.append({"length": f"~{length:g} s", "way": way, "trial_s": sum(trial_s) / max(len(trial_s), 1),
                         "wall_s": wall / args.repeats, "ray_start_s": ray_start / args.repeats,
                         "ratio": wall / pool, "ratio_with_start": (wall + ray_start) / pool})
    print(table(rows, ["length", "way", "trial_s", "wall_s", "ray_start_s", "ratio", "ratio_with_start"]))
    path = write_json("tune_overhead", {"args": vars(args), "steps_per_epoch": steps, "rows": rows, "runs": raw})
    print(f"json: {path}")
    at7 = [r["ratio"] for r in rows if r["way"] == "ours" and r["length"] == "~7 s"]
    print(f"ratio at 7 s: {at7[0]:.3f}" if at7 else "ratio at 7 s: nan (7 not in --lengths)")


if __name__ == "__main__":
    main()
