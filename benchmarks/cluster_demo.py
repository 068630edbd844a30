"""The README's cluster set-up on one machine, and what a study costs there: results in S3, MLflow on PostgreSQL
with its artifacts in S3, a two-node Ray cluster.

    make cluster-demo                                   # this script: starts it all, runs a study, stops it all
    python benchmarks/cluster_demo.py --keep 600        # ... and leaves it up 10 minutes to look around
    python benchmarks/cluster_demo.py --smoke           # the same, one epoch of one batch

It starts moto's S3-protocol server, PostgreSQL 15, `mlflow server` (runs in PostgreSQL, artifacts in S3) and a
Ray head with one worker node (the servers the tests start, ``tests/servers.py``), prints where each is, runs
``studies/vae_lr.py --quick`` on them with ``--storage s3://`` and a checkpoint every epoch, builds the report from
the bucket, and measures per trial-epoch: bytes uploaded to S3, S3 requests (from the S3 server's request log),
and the time checkpoints took (written and uploaded, as each trial reports it) as a share of the epochs' time.
Last line: that share.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, table, write_json

sys.path.insert(0, str(ROOT / "tests"))
from servers import mlflow_server, postgres_server, ray_cluster, s3_server  # noqa: E402 - the tests' own servers

BUCKET, PREFIX, STUDY = "vision-tune", "studies", "vae_lr"
REQUEST = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) /')


def results(s3, prefix: str) -> dict[str, list[dict]]:
    """Trial folder -> its reported rows, read from the bucket."""
    rows = {}
    for key in s3.keys(BUCKET, prefix):
        if key.endswith("/result.json"):
            body = s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
            rows[key.split("/")[-2]] = [json.loads(line) for line in body.splitlines() if line.strip()]
    return rows


def run(command: list[str], env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                         f"{done.stderr[-3000:]}")
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="one epoch of one batch: the code path only")
    parser.add_argument("--keep", type=float, default=0, metavar="S", help="leave everything up S seconds at the end")
    args = parser.parse_args()
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"vt-cluster-demo-{os.getpid()}"
    work.mkdir(parents=True)
    budget = ["--epochs", "1", "--steps-per-epoch", "1"] if args.smoke else ["--epochs", "2"]
    with contextlib.ExitStack() as stack:
        start = time.monotonic()
        s3 = stack.enter_context(s3_server())
        s3.make_bucket(BUCKET)
        postgres = stack.enter_context(postgres_server())
        mlflow = stack.enter_context(mlflow_server(postgres.create_database("mlflow"), f"s3://{BUCKET}/mlflow", s3.env))
        cluster = stack.enter_context(ray_cluster(workers=1, cpus=1, env=s3.env))
        print(f"S3 (moto):       {s3.endpoint}  bucket {BUCKET}  (AWS_ENDPOINT_URL={s3.endpoint})")
        print(f"PostgreSQL:      {postgres.uri('mlflow')}  (MLflow's runs)")
        print(f"MLflow server:   {mlflow.url}  (artifacts in s3://{BUCKET}/mlflow)")
        print(f"Ray cluster:     {cluster.address}  (a head and a worker node)")
        print(f"all up in {time.monotonic() - start:.0f} s; running {STUDY} --quick on them", flush=True)
        env = {**cluster.env, "PYTHONPATH": str(ROOT)}
        log = s3.log
        requests_before = _requests(log)
        began = time.monotonic()
        study = [sys.executable, str(ROOT / "studies" / f"{STUDY}.py"), "--quick", *budget, "--address",
                 cluster.address, "--storage", f"s3://{BUCKET}/{PREFIX}", "--mlflow-uri", mlflow.url,
                 "--checkpoint-every", "1"]
        done = run(study, env, work, timeout=900)
        seconds = time.monotonic() - began
        requests = _requests(log) - requests_before
        print(done.stdout.strip().splitlines()[-1])
        rows = results(s3, f"{PREFIX}/{STUDY}/")
        epochs = sum(len(r) for r in rows.values())
        uploaded = sum(item["Size"] for page in s3.client().get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=f"{PREFIX}/{STUDY}/") for item in page.get("Contents", []))
        trained = sum(row.get("time_this_iter_s", 0.0) for r in rows.values() for row in r)
        checkpoints = sum(row.get("checkpoint_s", 0.0) for r in rows.values() for row in r)
        measured = sum(1 for r in rows.values() for row in r if "checkpoint_s" in row)
        report = run([sys.executable, "-m", "analysis", f"s3://{BUCKET}/{PREFIX}/{STUDY}", "--out",
                      str(work / "report")], env, work, timeout=600)
        print(report.stdout.strip().splitlines()[-1])
        figures = {"trials": len(rows), "trial_epochs": epochs, "study_s": round(seconds, 1),
                   "bytes_per_trial_epoch": uploaded / max(epochs, 1),
                   "s3_requests_per_trial_epoch": (requests / max(epochs, 1)) if requests else None,
                   "checkpoints_measured": measured,
                   "checkpoint_share_of_epoch_time": checkpoints / trained if trained and measured else None}
        print(table([figures]))
        if args.keep:
            print(f"everything stays up for {args.keep:.0f} s (Ctrl-C to stop now)", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                time.sleep(args.keep)
    path = write_json("cluster_demo", {"figures": figures, "report": str(work / "report" / "index.html")},
                      smoke=args.smoke)
    print(f"stopped S3, PostgreSQL, MLflow and Ray; report kept at {work / 'report' / 'index.html'}; JSON: {path}")
    share = figures["checkpoint_share_of_epoch_time"]
    print(f"checkpoint share of epoch time: {share:.3f}" if share is not None else
          "checkpoint share of epoch time: not measured (one epoch: its only checkpoint is the last)")


def _requests(log: Path | None) -> int:
    """S3 requests the server logged so far (one access-log line each)."""
    if log is None or not log.is_file():
        return 0
    return sum(1 for line in log.read_text(errors="replace").splitlines() if REQUEST.search(line))


if __name__ == "__main__":
    main()
