"""What a trial process pays to import what it trains with: time and resident memory, today against what a trial
imported before the driver-only code left ``trainables/`` (pandas through the finding, MLflow's PyTorch flavour for
the model export the trial wrote at its end).

    python benchmarks/trial_footprint.py            # 5 fresh processes each way, medians
    python benchmarks/trial_footprint.py --smoke    # 1 each

Each way is a fresh ``python -c`` that imports the trainable's modules (the VAE task, the only Ray code of a trial)
and, for the "before" way, pandas and ``mlflow.pytorch`` too, then prints its import seconds and peak RSS.
Last line: the ratios today / before.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from common import ROOT, table, write_json

TODAY = "import trainables, trainables.vae, trainables.tune_io"
BEFORE = TODAY + "; import pandas, mlflow.pytorch"
PROBE = ("import resource, sys, time; start = time.perf_counter(); {imports}; "
         "print(__import__('json').dumps({{'import_s': time.perf_counter() - start, "
         "'rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
         "'driver_modules': sorted({{m.split('.')[0] for m in sys.modules}} & {{'pandas', 'scipy', 'mlflow', "
         "'analysis', 'studies', 'sklearn', 'matplotlib'}})}}))")


def probe(imports: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE.format(imports=imports)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    if done.returncode != 0:
        raise SystemExit(f"probe failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="one process each way")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    repeats = 1 if args.smoke else args.repeats
    runs = {"today": [], "before": []}
    for _ in range(repeats):  # alternated, so a slow moment of the machine falls on both
        runs["today"].append(probe(TODAY))
        runs["before"].append(probe(BEFORE))
    rows = [{"way": way, "import_s": statistics.median(r["import_s"] for r in found),
             "rss_mib": statistics.median(r["rss_mib"] for r in found), "driver_modules": ",".join(
                 found[0]["driver_modules"]) or "-"} for way, found in runs.items()]
    print(table(rows))
    time_ratio, rss_ratio = (rows[0][key] / rows[1][key] for key in ("import_s", "rss_mib"))
    path = write_json("trial_footprint", {"rows": rows, "runs": runs, "time_ratio": time_ratio,
                                          "rss_ratio": rss_ratio}, smoke=args.smoke)
    print(f"JSON: {path}")
    print(f"trial imports today / before: time {time_ratio:.3f}, resident memory {rss_ratio:.3f}")


if __name__ == "__main__":
    main()
