"""What does ASHA save on seg_search, and does it still find FIFO's best config?

Runs `studies/seg_search.py --quick` twice as a user would (subprocess, real Ray, MLflow on sqlite), with
the same Optuna seed and number of trials: once with `--scheduler asha` (grace 1 epoch, halving), once
with `--scheduler fifo`. With 8 trials Optuna's TPE is still in its random start-up phase, so both studies
propose the same configs and differ only in how long each trial runs. Reports trial-epochs spent (the sum
of each trial's last training_iteration, from its result.json) and whether the best configs agree.

    python benchmarks/asha_savings.py                       # 8 trials x 8 epochs, about 4 minutes on 2 cores
    python benchmarks/asha_savings.py --trials 16 --epochs 8
    python benchmarks/asha_savings.py --smoke               # 2 trials x 2 epochs of 1 step: the code path
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, table, write_json

METRIC = "val/precision"  # seg_search's metric (mode max)


def run(scheduler: str, args, tmp: Path) -> dict:
    """One seg_search study; returns its wall time, trials and trial-epochs."""
    storage = tmp / scheduler
    command = [sys.executable, str(ROOT / "studies" / "seg_search.py"), "--quick", "--search", "optuna",
               "--scheduler", scheduler, "--num-samples", str(args.trials), "--epochs", str(args.epochs),
               "--image-size", str(args.image_size), "--steps-per-epoch", str(args.steps_per_epoch),
               "--seed", str(args.seed), "--storage", str(storage), "--mlflow-uri", f"sqlite:///{tmp}/mlflow.db",
               *(["--data-root", str(args.data_root)] if args.data_root else [])]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"seg_search --scheduler {scheduler} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    trials = []
    for result_file in sorted((storage / "seg_search").glob("*/result.json")):
        results = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        params = json.loads((result_file.parent / "params.json").read_text())
        trials.append({"trial": result_file.parent.name, "epochs": results[-1]["training_iteration"],
                       "metric": results[-1].get(METRIC), "config": _varied(params)})
    return {"wall_s": wall, "trials": trials, "trial_epochs": sum(t["epochs"] for t in trials)}


def _varied(params: dict) -> dict:
    """The dimensions seg_search searches, rounded so both studies' configs compare equal."""
    lr = params["optim"]["lr"]
    return {"optim": params["optim"]["name"], "lr": float(f"{lr:.6g}"), "class_weights": params["class_weights"],
            "skip_concat": params["skip_concat"]}


def best(study: dict) -> dict:
    """The trial with the highest final metric among those that ran every epoch (ASHA's survivors)."""
    full = [t for t in study["trials"] if t["metric"] is not None]
    longest = max(t["epochs"] for t in full)
    return max((t for t in full if t["epochs"] == longest), key=lambda t: t["metric"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=8, help="max_t of ASHA; FIFO runs every trial this long")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps-per-epoch", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", type=Path, help="where the shapes scenes are written (default: the studies')")
    parser.add_argument("--smoke", action="store_true", help="2 trials x 2 epochs of 1 step, data in a temporary "
                        "folder: the code path, not a measurement")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vt-asha-"))
    if args.smoke:
        args.trials, args.epochs, args.steps_per_epoch = 2, 2, 1
        args.data_root = args.data_root or tmp / "data"
    try:  # checkpoints and MLflow artifacts of 16 U-Net trials take gigabytes: keep only the figures
        studies = {scheduler: run(scheduler, args, tmp) for scheduler in ("asha", "fifo")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    asha, fifo = studies["asha"], studies["fifo"]
    same_configs = sorted(map(str, (t["config"] for t in asha["trials"]))) == sorted(
        map(str, (t["config"] for t in fifo["trials"])))
    best_asha, best_fifo = best(asha), best(fifo)
    fifo_ranked = sorted(fifo["trials"], key=lambda t: -(t["metric"] or 0))
    rank = next((i + 1 for i, t in enumerate(fifo_ranked) if t["config"] == best_asha["config"]), None)
    rows = [{"scheduler": name, "trials": len(s["trials"]), "trial_epochs": s["trial_epochs"],
             "epochs_vs_fifo": s["trial_epochs"] / fifo["trial_epochs"], "wall_s": s["wall_s"],
             "wall_vs_fifo": s["wall_s"] / fifo["wall_s"], f"best {METRIC}": best(s)["metric"]}
            for name, s in studies.items()]
    print(table(rows))
    print(f"same {args.trials} configs proposed in both studies: {same_configs}")
    print(f"best config with ASHA: {best_asha['config']}")
    print(f"best config with FIFO: {best_fifo['config']}")
    agree = best_asha["config"] == best_fifo["config"]
    path = write_json("asha_savings", {"args": vars(args), "rows": rows, "same_configs": same_configs,
                                       "best_agrees": agree, "asha_best_rank_in_fifo": rank, "studies": studies},
                      smoke=args.smoke)
    print(f"json: {path}")
    print(f"ASHA spent {asha['trial_epochs']}/{fifo['trial_epochs']} trial-epochs "
          f"({asha['trial_epochs'] / fifo['trial_epochs']:.2f}x); best config agrees: {agree}"
          + ("" if agree else f" (ASHA's best ranks {rank} of {len(fifo_ranked)} under FIFO)"))


if __name__ == "__main__":
    main()
