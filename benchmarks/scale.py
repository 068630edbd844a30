"""What the runner's own work costs at a thousand trials: the same short trials through ``run_study`` (MLflow parent
and nested runs, names, study.json and trials.csv, the finding) and through a bare Tuner with no tracking.

    python benchmarks/scale.py               # 1,000 one-second VAE trials each way (about 20 minutes on 2 cores)
    python benchmarks/scale.py --trials 200
    python benchmarks/scale.py --smoke       # 10 trials each way

Both ways run the project's VAE trainable for ``--steps`` steps of a tiny config (about a second), two trials at
a time, ``reuse_actors``.
Measured: wall time (the runner's includes MLflow's waits at the end and the finding), the driver's peak resident
memory growth, then ``python -m analysis`` on the runner's study (the page's build time and size) and the MLflow
experiment's run count. Last line: the ratio of wall times, runner / bare (goal <= 1.15; Ray Tune's own release
test runs 10,000 one-second trials on 16 CPUs in 715 s against a 625 s floor, 1.14).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, table, write_json  # first: puts the repository on sys.path

import psutil

from trainables import OptimConfig, VAEConfig

LRS = [5e-3, 1e-3, 5e-4, 1e-4, 5e-5]


def base(data_root: Path, steps: int) -> VAEConfig:
    return VAEConfig(dataset="mnist5k", image_size=28, latent_dim=2, epochs=1, steps_per_epoch=steps, batch_size=32,
                     val_samples=64, feature_samples=8, data_root=str(data_root), optim=OptimConfig("adam", 5e-4))


class PeakRss:
    """The driver's peak resident memory above where it started, sampled every 0.2 s on a thread."""

    def __init__(self) -> None:
        import threading

        self.process, self.start, self.peak = psutil.Process(), psutil.Process().memory_info().rss, 0
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss - self.start)
            time.sleep(0.2)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return self.peak / 2**20


def through_runner(config: VAEConfig, samples: int, work: Path) -> dict:
    from ray import tune

    from studies.runner import run_study

    memory, start = PeakRss(), time.perf_counter()
    table_ = run_study("scale", config, {"optim": {"lr": tune.grid_search(LRS)}}, "val/loss", "min",
                       argv=["--num-samples", str(samples), "--max-concurrent", "2", "--storage", str(work / "results"),
                             "--mlflow-uri", f"sqlite:///{work / 'mlflow.db'}"])
    seconds = time.perf_counter() - start
    return {"way": "runner", "trials": len(table_), "ok": int((table_["status"] == "OK").sum()), "wall_s": seconds,
            "driver_mib": memory.stop()}


def through_bare_tuner(config: VAEConfig, samples: int, work: Path) -> dict:
    import ray
    from ray import tune

    from trainables import train_vae

    space = {**config.to_dict(), "optim": {**config.optim.__dict__, "lr": tune.grid_search(LRS)}}
    memory, start = PeakRss(), time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        results = tune.Tuner(tune.with_resources(train_vae, {"cpu": 1}), param_space=space,
                             tune_config=tune.TuneConfig(metric="val/loss", mode="min", num_samples=samples,
                                                         max_concurrent_trials=2, reuse_actors=True),
                             run_config=tune.RunConfig(name="bare", storage_path=str(work / "bare"), verbose=0)).fit()
    finally:
        ray.shutdown()
    seconds = time.perf_counter() - start
    return {"way": "bare Tuner", "trials": len(results), "ok": sum(1 for r in results if not r.error),
            "wall_s": seconds, "driver_mib": memory.stop()}


def report(work: Path) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "analysis", str(work / "results" / "scale"), "--no-mlflow"],
                          cwd=work, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"the report failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    page = work / "results" / "scale" / "report" / "index.html"
    return {"report_s": time.perf_counter() - start, "page_kib": page.stat().st_size / 1024}


def mlflow_runs(work: Path) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("scale")
    runs, token = 0, None
    while True:
        page = client.search_runs([experiment.experiment_id], max_results=1000, page_token=token)
        runs += len(page)
        token = page.token
        if not token:
            return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=1000, help="trials each way (a multiple of 5)")
    parser.add_argument("--steps", type=int, default=30, help="training steps a trial (30: about a second on a core, "
                                                                  "as Ray Tune's own release test's trials)")
    parser.add_argument("--smoke", action="store_true", help="10 trials each way: the code path only")
    args = parser.parse_args()
    trials = 10 if args.smoke else args.trials
    samples = max(1, trials // len(LRS))
    work = Path(tempfile.mkdtemp(prefix="vt-scale-"))
    try:
        config = base(work / "data", 1 if args.smoke else args.steps)
        rows = [through_bare_tuner(config, samples, work), through_runner(config, samples, work)]
        pages = report(work)
        runs = mlflow_runs(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    ratio = rows[1]["wall_s"] / rows[0]["wall_s"]
    print(f"report page of {rows[1]['trials']} trials: built in {pages['report_s']:.1f} s, {pages['page_kib']:.0f} KiB; "
          f"MLflow runs: {runs} (the study's parent among them)")
    path = write_json("scale", {"rows": rows, **pages, "mlflow_runs": runs, "ratio": ratio}, smoke=args.smoke)
    print(f"JSON: {path}")
    print(f"runner / bare Tuner wall time at {rows[1]['trials']} trials: {ratio:.3f} (goal <= 1.15)")


if __name__ == "__main__":
    main()
