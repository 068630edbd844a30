"""One pass over the parsed command line before anything starts: ranges, contradictions, and whether
``--address``, ``--storage`` and ``--mlflow-uri`` can be used at all.

Each failure is a ``UsageError`` that starts with the flag and the value as the user typed them and says
what would be valid, so that a study refuses in a second instead of hanging in ``ray.init`` or failing
inside Tune with a message about its internals.
"""
from __future__ import annotations

import argparse
import math
import os
import socket
import threading
import urllib.parse
from pathlib import Path
from typing import Callable

from studies.runner.errors import UsageError
from studies.runner.storage import check_storage as check_bucket

CONNECT_TIMEOUT_S = 3.0
STORAGE_TIMEOUT_S = 20.0  # an S3 URI resolves its bucket's region first: seconds, even when it fails
STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "file")
DB_SCHEMES = ("postgresql", "mysql", "mssql")  # SQLAlchemy stores, optionally "+driver"
MLFLOW_VALID = ("sqlite:///PATH.db (relative) or sqlite:////ABS/PATH.db, http(s)://HOST:PORT of an 'mlflow server', "
                "postgresql:// / mysql:// / mssql:// database URIs, or databricks")

# flag -> (smallest valid value, what the flag means when it matters for the message)
MINIMUM = {"epochs": (1, ""), "batch_size": (1, ""), "image_size": (0, " (0 = the data set's own size, VAE only)"),
           "steps_per_epoch": (0, " (0 = a full pass)"), "seed": (0, ""),
           "num_samples": (1, " (trials per grid point with --search grid, in total with --search optuna)"),
           "max_concurrent": (1, ""), "max_failures": (-1, " (-1 = retry without limit)"),
           "pending_timeout": (0, " seconds (0 = wait for the autoscaler without limit)")}


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_args(args: argparse.Namespace) -> None:
    """Every flag on its own, then the combinations; the slow checks (sockets, S3) last."""
    for dest, (lowest, meaning) in MINIMUM.items():
        value = getattr(args, dest, None)
        if value is not None and value < lowest:
            kind = "a number" if isinstance(value, float) else "an integer"
            raise UsageError(f"{flag(dest)} {value:g}: must be {kind} >= {lowest}{meaning}")
    cpus, gpus = args.cpus_per_trial, args.gpus_per_trial
    if not (math.isfinite(cpus) and cpus > 0):
        raise UsageError(f"--cpus-per-trial {cpus:g}: must be a number > 0 (fractions such as 0.5 share a core)")
    if not (math.isfinite(gpus) and gpus >= 0):
        raise UsageError(f"--gpus-per-trial {gpus:g}: must be a number >= 0 (0 = CPU only; fractions share a GPU)")
    if gpus > 1:  # Hardware.select would refuse it in every trial, after Ray had reserved the GPUs
        raise UsageError(f"--gpus-per-trial {gpus:g}: a trial trains on one GPU (there is no data-parallel "
                         "training inside a trial); valid: 0 (CPU only), a fraction such as 0.5 or 0.25 (trials "
                         "share a GPU), or 1 (Tune runs a trial on each GPU)")
    if getattr(args, "scheduler", None) == "pbt" and args.search == "optuna":
        raise UsageError("--scheduler pbt --search optuna: PBT refuses search algorithms (it makes its own "
                         "configs); use --search grid with pbt, or another --scheduler with optuna")
    if getattr(args, "pbt_interval", None) is not None and args.pbt_interval < 1:
        raise UsageError(f"--pbt-interval {args.pbt_interval}: must be an integer >= 1 (epochs between perturbations)")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: --resume continues the study in "
                         "--storage, --overwrite deletes it first; pass one")
    if args.data_root and Path(args.data_root).expanduser().is_file():
        raise UsageError(f"--data-root {args.data_root}: is a file; pass the folder that holds the data sets "
                         "(see README, 'Real data')")
    check_address(args.address or os.environ.get("RAY_ADDRESS"), "--address" if args.address else "RAY_ADDRESS")
    check_storage(args.storage)
    check_mlflow_uri(args.mlflow_uri)


def _connect(host: str, port: int) -> str | None:
    """None when something accepts a TCP connection at host:port, else why not."""
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return None
    except OSError as err:
        return err.strerror or type(err).__name__


def check_address(address: str | None, flag: str = "--address") -> None:
    """A Ray address that nothing answers makes ``ray.init`` wait without end: try a TCP connect first (``flag``:
    how the user gave it, the flag or the RAY_ADDRESS variable that ``ray.init`` reads when the flag is absent)."""
    if address in (None, "", "auto", "local"):
        return
    target = address[len("ray://"):] if address.startswith("ray://") else address
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{flag} {address}: expected HOST:PORT of the Ray head's GCS (e.g. 10.0.0.1:6379, "
                         "as 'ray status' prints it), ray://HOST:10001, 'auto', or nothing to start a local Ray")
    why = _connect(host.strip("[]"), int(port))
    if why:
        raise UsageError(f"{flag} {address}: no Ray head answers there ({why} within {CONNECT_TIMEOUT_S:g} s); "
                         "start one with 'ray start --head --port PORT', pass the address 'ray status' prints, "
                         "or drop --address to start a local Ray")


def _within(seconds: float, work: Callable[[], object]) -> tuple[bool, BaseException | None]:
    """Run ``work`` in a thread: (finished in time, what it raised)."""
    outcome: list = []

    def run() -> None:
        try:
            work()
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - reported to the caller
            outcome.append(err)

    thread = threading.Thread(target=run, daemon=True, name="storage-check")
    thread.start()
    thread.join(seconds)
    return bool(outcome), (outcome[0] if outcome else None)


def check_storage(storage: str) -> None:
    """A local folder that can be created and written, or a URI pyarrow can open and reach."""
    if "://" not in storage:
        path = Path(storage).expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise UsageError(f"--storage {storage}: {path} is a file; pass a folder (created if missing)")
        existing = path
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f"--storage {storage}: cannot write under {existing} (permission denied); pass a "
                             "folder you can write, or a shared path / s3:// URI on a cluster")
        return
    scheme = storage.split("://", 1)[0].lower()
    if scheme == "s3":
        check_bucket(storage)  # credentials, bucket, endpoint: one attempt, seconds, a message for each
    if scheme not in STORAGE_SCHEMES:
        raise UsageError(f"--storage {storage}: unknown scheme '{scheme}://'; valid are a local or shared folder, "
                         + ", ".join(f"{s}://" for s in STORAGE_SCHEMES))
    from pyarrow import fs

    def reach() -> None:
        filesystem, path = fs.FileSystem.from_uri(storage)
        filesystem.get_file_info(path)

    finished, error = _within(STORAGE_TIMEOUT_S, reach)
    if not finished:
        raise UsageError(f"--storage {storage}: no answer within {STORAGE_TIMEOUT_S:g} s; check the network and "
                         "credentials (AWS_* / GOOGLE_APPLICATION_CREDENTIALS), or use a local folder")
    if error is not None:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(f"--storage {storage}: cannot be reached ({first[:300]})")


def check_mlflow_uri(typed: str | None) -> None:
    """The scheme and, for sqlite, the file; a tracking server's health is checked by ``check_reachable``."""
    if not typed:
        return
    scheme = typed.split(":", 1)[0].lower() if ":" in typed else ""
    if scheme == "sqlite":
        if not typed.startswith("sqlite:///"):
            raise UsageError(f"--mlflow-uri {typed}: a sqlite URI has three slashes before a relative path "
                             "(sqlite:///mlflow.db) and four before an absolute one (sqlite:////abs/mlflow.db)")
        path = Path(os.path.abspath(typed[len("sqlite:///"):]))
        if path.is_dir():
            raise UsageError(f"--mlflow-uri {typed}: {path} is a folder; name the database file, e.g. "
                             f"sqlite:///{path}/mlflow.db")
        if path.is_file() and path.stat().st_size and path.read_bytes()[:16] != b"SQLite format 3\x00":
            raise UsageError(f"--mlflow-uri {typed}: {path} exists and is not a SQLite database")
        folder = path.parent
        if folder.is_dir() and not os.access(folder, os.W_OK):
            raise UsageError(f"--mlflow-uri {typed}: cannot write in {folder} (permission denied)")
        return
    if scheme in ("http", "https", "databricks", "databricks-uc") or scheme.split("+")[0] in DB_SCHEMES:
        return
    if scheme == "file" or "://" not in typed and len(scheme) <= 1:  # file:... or a bare folder (C: on Windows)
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
            raise UsageError(f"--mlflow-uri {typed}: a folder is MLflow's file store, which MLflow 3 refuses unless "
                             f"MLFLOW_ALLOW_FILE_STORE=true; valid: {MLFLOW_VALID}")
        return
    raise UsageError(f"--mlflow-uri {typed}: unknown scheme '{urllib.parse.urlparse(typed).scheme or scheme}'; "
                     f"valid: {MLFLOW_VALID}")
