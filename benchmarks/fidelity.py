"""Which of the report's findings hold on the embedded real data, with 3 seeds per variant?

Runs four study scripts as a user would (``python studies/X.py``: Ray Tune, MLflow on sqlite), each at a fixed
budget with 3 seeds per variant, and reads the verdict on the study's FINDING that the runner writes to its
finding.json (``analysis/finding.py``: Welch t intervals over seeds), and its trials from trials.csv:

    vae_latent, vae_lr    mnist5k (5,000 real MNIST digits), 4 epochs of the whole train split
    seg_class_weights     shapes (generated VOC-format scenes), 64x64, 3 epochs of 6 batches of 8, U-Net from
                          scratch (--pretrained: the report's ImageNet encoder, needs the weights file)
    cls_architectures     digits (1,797 real 8x8 digits at 32x32), 3 epochs of 8 batches of 32

The budgets were set by time alone, before any result was seen, and are never changed to make a claim come
out. One trial at these budgets took, in CPU seconds of its one thread (measured on a shared machine, so
about its time on an idle core): VAE 16, ResNet18 72, VGG16 44, U-Net 28. The 57 trials so need about
1,600 core-seconds, about 1,850 with per-trial and Ray start-up costs: about 16 minutes on 2 idle cores
(two trials at a time), under the 20 allowed. Prints a table of claim / measured / verdict, writes
benchmarks/out/fidelity.json; the last line is ``findings supported: K of N``.

    python benchmarks/fidelity.py             # the measurement (about 16 minutes on 2 idle cores)
    python benchmarks/fidelity.py --smoke     # 1 epoch, 2 seeds, a few batches: checks the code path only
    python benchmarks/fidelity.py --smoke --only vae_lr   # the smoke of one study (about 30 s)
    python benchmarks/fidelity.py --only seg_class_weights --pretrained   # weights in $TORCH_HOME
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, table, write_json

from analysis.finding import SUPPORTED

SEEDS = 3
# study -> the CLI flags of its budget, beside its embedded data set (DATA)
BUDGETS = {
    "vae_latent": ["--epochs", "4", "--steps-per-epoch", "0", "--batch-size", "64"],
    "vae_lr": ["--epochs", "4", "--steps-per-epoch", "0", "--batch-size", "64"],
    "seg_class_weights": ["--image-size", "64", "--epochs", "3", "--steps-per-epoch", "6", "--batch-size", "8"],
    "cls_architectures": ["--image-size", "32", "--epochs", "3", "--steps-per-epoch", "8", "--batch-size", "32"],
}
SMOKE = ["--epochs", "1", "--steps-per-epoch", "2"]
DATA = {"vae_latent": "mnist5k", "vae_lr": "mnist5k", "seg_class_weights": "shapes", "cls_architectures": "digits"}
PRETRAINED = {"seg_class_weights"}  # studies whose base config starts from ImageNet weights (--no-pretrained applies)


def run(name: str, args, tmp: Path) -> dict:
    """One study script at its budget, in its own process; returns the verdict it wrote as a row."""
    storage = tmp / "results"
    command = [sys.executable, str(ROOT / "studies" / f"{name}.py"), "--dataset", DATA[name], *BUDGETS[name],
               *(SMOKE if args.smoke else []), "--num-samples", str(2 if args.smoke else SEEDS),
               "--seed", str(args.seed), "--storage", str(storage), "--data-root", str(tmp / "data"),
               "--mlflow-uri", f"sqlite:///{tmp / 'mlflow.db'}"]
    if name in PRETRAINED and not args.pretrained:
        command.append("--no-pretrained")  # offline by default: nothing to download
    start = time.perf_counter()
    done = subprocess.run(command, cwd=tmp, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - start
    finding = storage / name / "finding.json"
    if done.returncode != 0 or not finding.exists():
        raise RuntimeError(f"studies/{name}.py exited {done.returncode} without writing {finding}:\n"
                           f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    verdict = json.loads(finding.read_text())
    with open(storage / name / "trials.csv", newline="") as f:
        trials = list(csv.DictReader(f))
    return {"study": name, "data": DATA[name], "claim": f"{verdict['claim']} (report {verdict['section']})",
            "metric": verdict["metric"], "measured": verdict["measured"], "verdict": verdict["verdict"],
            "n": verdict["n"], "trials": len(trials), "ok": sum(t["status"] == "OK" for t in trials),
            "seconds": round(seconds, 1), "method": verdict["method"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="1 epoch, 2 seeds: the code path, not a measurement")
    parser.add_argument("--pretrained", action="store_true", help="seg_class_weights with the ImageNet encoder")
    parser.add_argument("--seed", type=int, default=0, help="base seed (sample i derives its own from it)")
    parser.add_argument("--only", nargs="+", choices=sorted(BUDGETS), help="a subset of the studies")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vt-fidelity-"))
    rows, start = [], time.perf_counter()
    try:
        for name in args.only or BUDGETS:
            rows.append(run(name, args, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # GBs of checkpoints
    total = time.perf_counter() - start
    supported = sum(row["verdict"] == SUPPORTED for row in rows)
    path = write_json("fidelity", {
        "smoke": args.smoke, "seeds": 2 if args.smoke else SEEDS, "pretrained": args.pretrained,
        "budgets": BUDGETS, "seconds": round(total, 1), "rows": rows, "supported": supported, "of": len(rows)},
        smoke=args.smoke)
    print("\n=== fidelity: the report's findings on the embedded real data" + (" (SMOKE: not a measurement)"
                                                                            if args.smoke else "") + " ===")
    print(table(rows, ["study", "data", "n", "trials", "ok", "seconds", "verdict"]))
    for row in rows:
        print(f"\n{row['study']}: {row['claim']}\n  measured: {row['measured']}\n  verdict: {row['verdict']} "
              f"({row['method']})")
    print(f"\ntotal {total:.0f} s; {path}")
    print(f"findings supported: {supported} of {len(rows)}")


if __name__ == "__main__":
    main()
