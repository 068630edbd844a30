"""What does a study through our runner cost over the same training in a plain process pool?

N trials of the VAE on embedded mnist5k (our trainable: 4+ epochs, a checkpoint per epoch (--checkpoint-every 1;
auto, the runner's default, writes only the last one at these lengths), end-of-trial artifacts, which run_trial
writes in every way), each calibrated to about T seconds of training, run four ways (five with --ways ... reuse)
with the same parallelism P:
  (a) ours:   run_study (Ray Tune, reuse_actors, CheckpointConfig(num_to_keep=2), MLflow on sqlite: a parent
              run, nested trial runs with dataset inputs, final checkpoints and models uploaded off Tune's loop)
  (b) pool:   ProcessPoolExecutor(P) (spawn: workers import torch, as Ray's do) calling run_trial with
              a LocalSession (checkpoints copied to a folder) -- the limit
  (c) optuna: study.optimize(n_jobs=P), which runs trials in *threads* of one process; run_trial sets
              torch to 1 intra-op thread (per process, so P threads use P cores)
  (d) plain:  a Tuner with Tune's defaults (a fresh worker per trial, every checkpoint kept, no MLflow)
  (e) reuse:  (d) with reuse_actors=True and CheckpointConfig(num_to_keep=2), no MLflow: Ray Tune's own
              floor, so that (a) - (e) is what our runner itself adds (MLflow, callbacks, checks, table)
Every wall time is divided by (b)'s from the same round; rounds alternate the order (ABBA). (a), (d) and (e)
run in a fresh Python process each (imports done before timing, as for (b) and (c)). Ray's start
(ray.init + ray.shutdown) is timed apart: for (d) and (e) around the Tuner, for (a) inside run_study, which starts
Ray itself as in a CLI run (its MLflow set-up overlaps that start). (a) logs into an MLflow database that
already exists, as after a first study; creating a new one (schema migrations, once) is timed apart.
Ray runs its workers at niceness 15; the pool's workers and Optuna's trial threads get the same (--nice),
so that on a shared machine other users' load slows every way alike. For (d) and (e) the driver's time in Tune's
experiment snapshots is counted apart for those ``num_to_keep`` forces (Tune's "snapshotting has been triggered
multiple times ... may become a bottleneck" warning, which the runner silences on this evidence); (e) keeps the
checkpoints as (a) does. Tune's public hooks show them (a Callback and a Stopper: benchmarks/snapshot_clock.py).

    python benchmarks/tune_overhead.py                       # 8 trials of ~7 s, 2 rounds (ABBA): ~6.5 min on 2 cores
    python benchmarks/tune_overhead.py --lengths 2           # ~3.5 min
    python benchmarks/tune_overhead.py --lengths 30 --repeats 1   # ~10 min: 8 trials of 10 epochs
    python benchmarks/tune_overhead.py --ways pool ours reuse --repeats 4   # ours vs Ray Tune's own floor
    python benchmarks/tune_overhead.py --smoke    # pool, ours, optuna, reuse once, 2 trials of 2 epochs of 1 step:
                                                  # the code path (plain is reuse's with 2 settings), no measurement

Defaults measure ~7-s trials only, in two rounds, to stay under 10 minutes on 2 cores (8 trials x 3 lengths
x 4 ways is over 10 minutes of training alone); the ~2-s and ~30-s figures come from the flags above.
Trials longer than one pass over mnist5k per epoch get more epochs (a report and a checkpoint each), not
longer epochs. A round's ratio swings by +-5% even on an idle machine (more when other jobs share it); the
per-round column shows the spread, so compare ways within a run.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import math
import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, table, write_json

WAYS = ("pool", "ours", "optuna", "plain", "reuse")  # (b) first: every ratio divides by it
DEFAULT_WAYS = WAYS[:4]  # the four; reuse (the floor of Ray Tune itself) on request
NICE = 15  # Ray's default worker niceness (RAY_worker_niceness); --nice changes it for pool and Optuna
STUDY = "bench_ours"
BATCH = 64


def vae_config(root: str, steps: int, epochs: int, every: str, seed: int = 0) -> dict:
    """The trial: a small fixed VAE workload, a checkpoint ``every`` (--checkpoint-every); only the seed differs
    between trials."""
    from trainables import VAEConfig

    return VAEConfig(dataset="mnist5k", image_size=28, batch_size=BATCH, epochs=epochs, steps_per_epoch=steps,
                     val_samples=128, feature_samples=64, seed=seed, data_root=root, checkpoint_every=every).to_dict()


def local_trial(config: dict, out_dir: str) -> tuple[float, float]:
    """One trial without Ray (the pool's and Optuna's body); returns its seconds and val/loss."""
    from trainables.tune_io import LocalSession, run_trial
    from trainables.vae import TASK

    start = time.perf_counter()
    metrics = run_trial(config, TASK, LocalSession(out_dir, cpus=1))
    return time.perf_counter() - start, metrics["val/loss"]


def _calibration_runs(root: str, epochs: int, every: str, out_dir: str) -> tuple[float, float]:
    """(seconds of a 1-step trial, seconds of a 12-step trial) after a warm-up trial, in one worker."""
    local_trial(vae_config(root, 1, epochs, every), f"{out_dir}/warm")  # data cache, first-call costs
    fixed = min(local_trial(vae_config(root, 1, epochs, every), f"{out_dir}/f{i}")[0] for i in range(2))
    return fixed, local_trial(vae_config(root, 12, epochs, every), f"{out_dir}/l")[0]


def calibrate(root: str, epochs: int, every: str, lengths: list[float], workers: int) -> dict[float, tuple[int, int]]:
    """(steps_per_epoch, epochs) per target length, timed in a pool of ``workers`` running side by side (as the
    trials will, so that sharing the cores is part of the per-step time). An epoch is at most one pass over
    mnist5k's 4,000 training digits (62 batches), so long trials get more epochs rather than longer ones."""
    tmp = tempfile.mkdtemp(prefix="vt-cal-")
    with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                initializer=_lower_priority, initargs=(NICE,)) as pool:
        runs = list(pool.map(_calibration_runs, [root] * workers, [epochs] * workers, [every] * workers,
                             [f"{tmp}/w{i}" for i in range(workers)]))
    shutil.rmtree(tmp, ignore_errors=True)
    fixed = sum(f for f, _ in runs) / workers
    per_step = max(sum(long - f for f, long in runs) / workers / (11 * epochs), 1e-4)
    logging.info("calibration (%d side by side): fixed %.2f s per trial, %.1f ms per step", workers, fixed,
                 per_step * 1e3)
    from trainables.data import build_dataset

    one_pass = len(build_dataset("mnist5k", "train", root, 28)) // BATCH
    plan = {}
    for length in lengths:
        total = max(1.0, (length - fixed) / per_step)  # training steps in the whole trial
        trial_epochs = max(epochs, math.ceil(total / one_pass))
        plan[length] = (max(1, round(total / trial_epochs)), trial_epochs)
    return plan


def _lower_priority(nice: int) -> None:
    """This thread (on Linux a thread has its own niceness) at ``nice``, as Ray runs its workers."""
    current = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if nice > current:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def _clear_data_caches() -> None:
    """Forget mnist5k in this process, so that Optuna's trials load it as every other way's workers do."""
    from trainables.data.classification import mnist5k_arrays

    mnist5k_arrays.cache_clear()


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
    _clear_data_caches()
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


def run_in_child(way: str):
    """(a), (d) and (e) in a fresh Python process each, so every round pays the same imports and Ray state."""
    def run(configs: list[dict], workers: int, tmp: Path) -> dict:
        (tmp / "configs.json").write_text(json.dumps(configs))
        command = [sys.executable, __file__, "--child", way, "--workers", str(workers), "--tmp", str(tmp)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        lines = [line for line in done.stdout.splitlines() if line.startswith("CHILD-RESULT ")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"{way} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return json.loads(lines[-1][len("CHILD-RESULT "):])
    return run


def child(way: str, workers: int, tmp: Path) -> dict:
    """The body of (a), (d) or (e) in this fresh process: imports first, then Ray's start, the study, Ray's stop."""
    import ray
    from ray import tune

    from snapshot_clock import SnapshotClock
    from studies.runner import run_study
    from studies.runner.preflight import KEEP_CHECKPOINTS
    from trainables import VAEConfig, train_vae

    configs = json.loads((tmp / "configs.json").read_text())
    seeds = tune.grid_search([c["seed"] for c in configs])
    snapshots = None
    if way == "ours":  # as the CLI runs: run_study starts and stops Ray itself; those two calls are timed apart
        spent = [0.0]
        ray.init, ray.shutdown = _timed(ray.init, spent), _timed(ray.shutdown, spent)
        argv = ["--storage", str(tmp / "storage"), "--mlflow-uri", f"sqlite:///{tmp.parent}/mlflow.db",
                "--cpus-per-trial", "1", "--max-concurrent", str(workers)]
        start = time.perf_counter()
        summary = run_study(STUDY, VAEConfig.from_dict(configs[0]), {"seed": seeds}, metric="val/loss", mode="min",
                            argv=argv)
        wall, ray_start = time.perf_counter() - start - spent[0], spent[0]
        result = {"trials_ok": int((summary["status"] == "OK").sum())}
    else:
        start = time.perf_counter()
        ray.init(num_cpus=workers, include_dashboard=False, configure_logging=True, logging_level=logging.WARNING)
        ray_start = time.perf_counter() - start
        start = time.perf_counter()
        keep = KEEP_CHECKPOINTS if way == "reuse" else None
        clock = SnapshotClock(keep)
        tuner = tune.Tuner(tune.with_resources(train_vae, {"cpu": 1}), param_space={**configs[0], "seed": seeds},
                           tune_config=tune.TuneConfig(metric="val/loss", mode="min", reuse_actors=way == "reuse"),
                           run_config=tune.RunConfig(
                               name=f"bench_{way}", storage_path=str(tmp / "storage"), callbacks=[clock],
                               stop=clock.stopper, checkpoint_config=tune.CheckpointConfig(num_to_keep=keep)))
        result = {"trials_ok": sum(not r.error for r in tuner.fit())}
        wall = time.perf_counter() - start
        stop = time.perf_counter()
        ray.shutdown()
        ray_start += time.perf_counter() - stop
        snapshots = clock.totals()
    kept = sorted((tmp / "storage").glob("*/*/checkpoint_*"))
    size = sum(f.stat().st_size for c in kept for f in c.rglob("*") if f.is_file())
    return {"wall_s": wall, "ray_start_s": ray_start, **result, "checkpoints_kept": len(kept),
            "checkpoint_mib": round(size / max(len(kept), 1) / 2**20, 2),
            **({"snapshots": snapshots} if snapshots else {})}


def _timed(function, spent: list[float]):
    """``function`` that adds the seconds each call takes to ``spent[0]``."""
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start
    return timed


def new_mlflow_db(path: Path) -> float:
    """Create the MLflow database once (a fresh Python process); returns the seconds it took."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import sys; from mlflow.tracking import MlflowClient; "
                    "MlflowClient(tracking_uri=sys.argv[1]).search_experiments()", f"sqlite:///{path}"],
                   check=True, capture_output=True)
    return time.perf_counter() - start


def mlflow_runs(path: Path) -> dict:
    """(a)'s trial runs by status (its parent runs apart) and val/loss epochs per trial run, read with sqlite3 (no
    MLflow import here)."""
    join = ("FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id WHERE e.name = ? AND r.run_uuid IN "
            "(SELECT run_uuid FROM tags WHERE key = 'vision_tune.trial_id')")
    with sqlite3.connect(path) as db:
        runs = dict(db.execute(f"SELECT r.status, COUNT(*) {join} GROUP BY r.status", (STUDY,)).fetchall())
        epochs = db.execute(f"SELECT COUNT(*) FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid "
                            f"JOIN experiments e ON r.experiment_id = e.experiment_id "
                            f"WHERE e.name = ? AND m.key = 'val/loss'", (STUDY,)).fetchone()[0]
        parents = db.execute("SELECT COUNT(*) FROM tags WHERE key = 'vision_tune.study_run'").fetchone()[0]
        models = db.execute("SELECT COUNT(*) FROM logged_models").fetchone()[0]
    return {**runs, "val_loss_epochs_per_run": epochs / max(sum(runs.values()), 1), "parent_runs": parents,
            "logged_models": models}


RUNNERS = {"pool": run_pool, "ours": run_in_child("ours"), "optuna": run_optuna, "plain": run_in_child("plain"),
           "reuse": run_in_child("reuse")}


def main() -> None:
    global NICE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=float, nargs="+", default=[7.0], help="seconds of training per trial")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="trials at once (pool workers, Optuna n_jobs, CPUs)")
    parser.add_argument("--epochs", type=int, default=4, help="reports and checkpoints per trial (at least)")
    parser.add_argument("--checkpoint-every", default="1", help="the trials' checkpoint policy (auto, N epochs, Ns)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds per length; odd rounds run in reverse order")
    parser.add_argument("--ways", nargs="+", default=list(DEFAULT_WAYS), choices=WAYS)
    parser.add_argument("--nice", type=int, default=NICE, help="niceness of pool workers and Optuna threads")
    parser.add_argument("--child", choices=("ours", "plain", "reuse"), help=argparse.SUPPRESS)
    parser.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="pool, ours, optuna and reuse once: 2 trials of 2 epochs "
                        "of 1 step, one round; the code path, not a measurement")
    args = parser.parse_args()
    if args.child:
        print("CHILD-RESULT " + json.dumps(child(args.child, args.workers, args.tmp)))
        return
    if args.smoke:
        args.lengths, args.trials, args.epochs, args.repeats = [1.0], 2, 2, 1
        args.ways = ["pool", "ours", "optuna", "reuse"]  # 2 epochs: two checkpoints can force a snapshot
    NICE = args.nice
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("trainables").setLevel(logging.WARNING)  # Optuna's trials run in this process
    ways = ["pool", *[w for w in args.ways if w != "pool"]]
    work = Path(tempfile.mkdtemp(prefix="vt-overhead-"))
    root = str(work / "data")
    plan = calibrate(root, args.epochs, args.checkpoint_every, args.lengths, args.workers)
    new_db_s = new_mlflow_db(work / "mlflow.db") if "ours" in ways else None
    rows, raw = [], []
    for length in args.lengths:
        steps, epochs = plan[length]
        configs = [vae_config(root, steps, epochs, args.checkpoint_every, seed) for seed in range(args.trials)]
        walls: dict[str, list[float]] = {w: [] for w in ways}
        starts: dict[str, list[float]] = {w: [] for w in ways}
        pool_trials: list[float] = []
        for round_ in range(args.repeats):
            for way in (ways if round_ % 2 == 0 else ways[::-1]):  # ABBA: drift in the load cancels
                tmp = Path(tempfile.mkdtemp(prefix=f"{way}-", dir=work))
                logging.info("%s, %d trials of ~%g s, round %d", way, args.trials, length, round_ + 1)
                result = RUNNERS[way](configs, args.workers, tmp)
                shutil.rmtree(tmp, ignore_errors=True)
                raw.append({"length": length, "way": way, "round": round_, "steps_per_epoch": steps, "epochs": epochs,
                            **result})
                walls[way].append(result["wall_s"])
                starts[way].append(result.get("ray_start_s", 0.0))
                pool_trials += result.get("trial_s", []) if way == "pool" else []
        pool = sum(walls["pool"])
        for way in ways:
            wall, ray_start = sum(walls[way]), sum(starts[way])
            per_round = "/".join(f"{w / b:.2f}" for w, b in zip(walls[way], walls["pool"]))
            rows.append({"length": f"~{length:g} s", "epochs": epochs, "way": way,
                         "pool_trial_s": sum(pool_trials) / len(pool_trials),
                         "wall_s": wall / args.repeats, "ray_start_s": ray_start / args.repeats,
                         "ratio": wall / pool, "ratio_with_start": (wall + ray_start) / pool, "per_round": per_round})
    runs = mlflow_runs(work / "mlflow.db") if "ours" in ways else {}
    shutil.rmtree(work, ignore_errors=True)
    print(table(rows, ["length", "epochs", "way", "pool_trial_s", "wall_s", "ray_start_s", "ratio", "ratio_with_start",
                       "per_round"]))
    if new_db_s is not None:
        print(f"(a) checks: {runs} MLflow runs; a new MLflow database took {new_db_s:.1f} s once "
              "(a CLI study overlaps it with Ray's start)")
    for way in ways:
        spent = [r["snapshots"] for r in raw if r["way"] == way and "snapshots" in r]
        if spent:
            total = {key: sum(s[key] for s in spent) / len(spent) for key in spent[0]}
            print(f"({way}) experiment snapshots per study: {total['forced']:.0f} forced by num_to_keep, "
                  f"{total['forced_s']:.2f} s of the driver's loop; {total['periodic']:.0f} periodic, "
                  f"{total['periodic_s']:.2f} s")
    default = args.lengths == [7.0] or args.smoke
    name = "tune_overhead" + ("" if default else "_" + "_".join(f"{t:g}s" for t in args.lengths))
    path = write_json(name, {"args": {k: str(v) for k, v in vars(args).items()}, "steps_and_epochs": plan,
                             "new_mlflow_db_s": new_db_s, "mlflow_runs": runs, "rows": rows, "runs": raw},
                      smoke=args.smoke)
    print(f"json: {path}")
    at = 7.0 if 7.0 in args.lengths else args.lengths[0]
    ratio = [r["ratio"] for r in rows if r["way"] == "ours" and r["length"] == f"~{at:g} s"]
    print(f"ratio at {at:g} s: {ratio[0]:.3f}" if ratio else f"ratio at {at:g} s: nan (--ways without ours)")


if __name__ == "__main__":
    main()
