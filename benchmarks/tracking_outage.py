"""Does an MLflow outage hold a study up? The same study with and without its tracking server stopped mid-study.

`studies/vae_lr.py --quick --search optuna` (embedded mnist5k, N trials, MLflow over HTTP: `mlflow server` on a sqlite
database, started here on a free port) run twice as a user would (a subprocess each, real Ray): once with the server
up throughout, once with it stopped at the study's first logged epoch and started again --outage-s later on the same
port and database. The epochs are sized from a short calibration study so that training outlasts the outage by about
a minute (a study that ended during the outage would wait for the server at its end: that is the end's bounded wait,
not the trials'). Reports both wall times (the command's, Ray's start included), their ratio, the epochs the trials
reported while the server was away, the tracker's "away" and "back" lines, and whether every epoch reached MLflow.

    python benchmarks/tracking_outage.py                  # a 5-minute outage: about 15 minutes on 2 cores
    python benchmarks/tracking_outage.py --outage-s 60    # about 5 minutes
    python benchmarks/tracking_outage.py --smoke          # a 5 s outage, one trial of 12 epochs: the code path
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, table, write_json

from studies.runner.tracking_queue import answers

AWAY, BACK = "MLflow tracking away since", "MLflow tracking back at"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TrackingServer:
    """`mlflow server` on 127.0.0.1:port with its runs in folder/mlflow.db, in a process group of its own; stopped and
    started again on the same port and database."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder, self.url = folder, f"http://127.0.0.1:{port}"
        self.cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                    f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts"),
                    "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.folder / "server.log", "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.folder,
                                         start_new_session=True)
        start = time.monotonic()
        while not answers(self.url, timeout=2):
            if self.proc.poll() is not None or time.monotonic() - start > 120:
                raise RuntimeError(f"mlflow server did not start; see {self.folder / 'server.log'}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


def first_epoch_logged(url: str, proc: subprocess.Popen) -> None:
    """Wait until a trial's first epoch is in MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    while proc.poll() is None:
        experiment = client.get_experiment_by_name("vae_lr")
        if experiment and client.search_runs([experiment.experiment_id], "metrics.epoch >= 1", max_results=1):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the study exited ({proc.returncode}) before its first epoch")


def mlflow_epochs(url: str) -> list[tuple[str, int]]:
    """(trial id, step) of every logged "epoch" value, duplicates included."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("vae_lr")
    return [(run.data.tags["vision_tune.trial_id"], metric.step)
            for run in client.search_runs([experiment.experiment_id]) if "vision_tune.trial_id" in run.data.tags
            for metric in client.get_metric_history(run.info.run_id, "epoch")]


def reports(study: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(study.glob("*/result.json"))
            for line in path.read_text().splitlines() if line.strip()]


def run_study(folder: Path, args, epochs: int, outage_s: float | None) -> dict:
    """One study; with ``outage_s`` the server is stopped at its first logged epoch for that long. Returns its wall
    time, the tracker's lines, the epochs reported during the outage and whether MLflow holds every epoch once."""
    (folder / "server").mkdir(parents=True)
    server = TrackingServer(folder / "server", free_port())
    command = [sys.executable, str(ROOT / "studies" / "vae_lr.py"), "--quick", "--search", "optuna", "--num-samples",
               str(args.trials), "--epochs", str(epochs), "--steps-per-epoch", str(args.steps_per_epoch),
               "--storage", str(folder / "results"), "--mlflow-uri", server.url]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    stopped = restarted = ended = None
    server.start()
    try:
        with open(folder / "out", "w") as out, open(folder / "err", "w") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(command, cwd=folder, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            if outage_s is not None:
                first_epoch_logged(server.url, proc)
                server.stop()
                stopped = time.time()
                while time.time() < stopped + outage_s:
                    if ended is None and proc.poll() is not None:
                        ended = time.perf_counter()  # it gave up waiting for the server: its runs are incomplete
                    time.sleep(0.1)
                server.start()
                restarted = time.time()
            code = proc.wait()
            ended = ended or time.perf_counter()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        logged = mlflow_epochs(server.url)
    finally:
        server.stop()
    stderr = (folder / "err").read_text()
    if code != 0:
        raise RuntimeError(f"the study exited {code}:\n{(folder / 'out').read_text()[-2000:]}\n{stderr[-3000:]}")
    rows = reports(folder / "results" / "vae_lr")
    expected = sorted((row["trial_id"], row["epoch"]) for row in rows)
    during = [row for row in rows if stopped and stopped < row["timestamp"] < restarted]
    return {"wall_s": ended - start, "epochs": epochs, "trial_epochs": len(rows), "epochs_during_outage": len(during),
            "every_epoch_once": sorted(logged) == expected, "stopped": stopped, "restarted": restarted,
            "away": [line for line in stderr.splitlines() if AWAY in line],
            "back": [line for line in stderr.splitlines() if BACK in line]}


def calibrate(folder: Path, args) -> float:
    """Seconds per epoch of one trial, from a short study (its reports' time_this_iter_s after the first)."""
    study = run_study(folder, argparse.Namespace(**{**vars(args), "trials": 1}), 8, None)
    rows = reports(folder / "results" / "vae_lr")
    seconds = sorted(row["time_this_iter_s"] for row in rows[1:])
    return seconds[len(seconds) // 2] if seconds else study["wall_s"] / 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outage-s", type=float, default=300.0, help="how long the server is stopped (default 300)")
    parser.add_argument("--trials", type=int, default=2, help="trials, two at a time (default 2)")
    parser.add_argument("--steps-per-epoch", type=int, default=10)
    parser.add_argument("--epochs", type=int, help="default: sized so that training outlasts the outage by ~60 s")
    parser.add_argument("--smoke", action="store_true", help="a 5 s outage, one trial of 12 epochs of 3 steps")
    args = parser.parse_args()
    if args.smoke:
        args.outage_s, args.trials, args.steps_per_epoch, args.epochs = 5.0, 1, 3, 12
    tmp = Path(tempfile.mkdtemp(prefix="vt-outage-"))
    seconds_per_epoch = None
    try:
        if args.epochs is None:
            seconds_per_epoch = calibrate(tmp / "calibration", args)
            args.epochs = math.ceil((args.outage_s + 60) / seconds_per_epoch)
        studies = {"without": run_study(tmp / "without", args, args.epochs, None),
                   "with": run_study(tmp / "with", args, args.epochs, args.outage_s)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    without, with_ = studies["without"], studies["with"]
    ratio = with_["wall_s"] / without["wall_s"]
    rows = [{"outage_s": args.outage_s if name == "with" else 0, "trials": args.trials, "epochs": s["epochs"],
             "wall_s": s["wall_s"], "epochs_during_outage": s["epochs_during_outage"],
             "every_epoch_once": s["every_epoch_once"]} for name, s in studies.items()]
    print(table(rows))
    for line in with_["away"] + with_["back"]:
        print(line)
    if not with_["back"]:
        print("(no 'back' line: the study ended before the server returned; more --epochs make it outlast the outage)")
    path = write_json("tracking_outage", {"args": vars(args), "seconds_per_epoch": seconds_per_epoch, "rows": rows,
                                          "studies": studies, "ratio": ratio}, smoke=args.smoke)
    print(f"json: {path}")
    print(f"wall time with a {args.outage_s:.0f} s MLflow outage / without: {ratio:.3f} "
          f"({with_['wall_s'] - without['wall_s']:+.1f} s)")


if __name__ == "__main__":
    main()
