"""study.json: what a study is (its effective config, space and budget) and every invocation that ran it.

A resume recomputes what the study would be from the new command line and compares it with what was
recorded: a change of budget, space, data or seeds would mix two studies in one table, so it is refused
with the list; what a resume can honour (where to log, retries, resources, the cluster) is applied and
written into the new invocation's entry. Nothing here imports Ray.
"""
from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import logging
import os
import shlex
import socket
from pathlib import Path

from studies.runner.errors import MASK, StudyInterrupted, UsageError, redact
from studies.runner.storage import has_trial_results, remove_study
from studies.runner.space import describe
from trainables import TrainConfig
from analysis.ray_internals import SNAPSHOT_GLOB, parse_snapshot

log = logging.getLogger("vision_tune")
# flags a resume applies (new value wins, recorded in the invocation), as (argparse dest, flag)
APPLIED = (("mlflow_uri", "--mlflow-uri"), ("max_failures", "--max-failures"), ("cpus_per_trial", "--cpus-per-trial"),
           ("gpus_per_trial", "--gpus-per-trial"), ("address", "--address"))
# what the study is: any change is refused on resume
DEFINING = ("metric", "mode", "search", "scheduler", "trials", "max_concurrent", "space", "objectives")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def definition(name: str, base: TrainConfig, space: dict, metric: str, mode: str, args: argparse.Namespace,
               trials: int) -> dict:
    """The study as the trials see it: base config after the flags, the space, the search and its budget."""
    return {"name": name, "task": base.TASK, "metric": metric, "mode": mode, "base": base.to_dict(), "space": describe(space),
            "search": args.search, "scheduler": args.scheduler, "trials": trials,
            "max_concurrent": args.max_concurrent}


def invocation(args: argparse.Namespace, uri: str, command: list[str]) -> dict:
    """One run of the command: who, where, when, and the settings a resume may change."""
    return {"argv": [redact(arg) for arg in command], "cwd": os.getcwd(), "host": socket.gethostname(),
            "pid": os.getpid(), "started": now(), "resume": bool(args.resume), "state": "running",
            **{dest: (redact(uri) if dest == "mlflow_uri" else getattr(args, dest)) for dest, _ in APPLIED}}


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def differences(recorded: dict, new: dict) -> list[str]:
    """What the new command line would change in a recorded study, one 'field: old -> new' per line."""
    lines = []
    old_base, new_base = _flat(recorded.get("base", {})), _flat(new["base"])
    for key in sorted(set(old_base) | set(new_base)):
        if key in old_base and old_base.get(key) != new_base.get(key):
            lines.append(f"{key}: {old_base.get(key)!r} -> {new_base.get(key)!r}")
    for key in DEFINING:
        if key in recorded and json.dumps(recorded[key], sort_keys=True, default=str) != json.dumps(
                new[key], sort_keys=True, default=str):
            lines.append(f"{key}: {json.dumps(recorded[key], default=str)} -> {json.dumps(new[key], default=str)}")
    return lines


def applied_changes(recorded: dict, current: dict) -> list[str]:
    """The resume-safe settings that differ from the last invocation's: applied, and said so."""
    last = (recorded.get("invocations") or [{}])[-1]
    return [f"{flag} {last.get(dest)!r} -> {current[dest]!r}" for dest, flag in APPLIED
            if dest in last and last.get(dest) != current[dest]]


def resume_command(argv: list[str]) -> str:
    """The command that continues this study: the same flags plus --resume (never --overwrite)."""
    script, *flags = argv
    flags = [a for a in flags if a not in ("--overwrite", "--resume")]
    return shlex.join(["python", script, *flags, "--resume"])


def check_resume(recorded: dict | None, new: dict, study_dir: str) -> None:
    """Refuse a resume that would change what the study is (or that has nothing to resume)."""
    if recorded is None:
        raise UsageError(f"--resume: {study_dir} holds no study (no study.json); run without --resume to start it")
    changed = differences(recorded, new)
    if changed:
        first = (recorded.get("invocations") or [{"argv": recorded.get("argv", [])}])[0].get("argv") or []
        hint = f"\nresume with the study's own flags: {resume_command(first)}" if first else ""
        raise UsageError(f"--resume would change the study in {study_dir}: " + "; ".join(changed) +
                         f". Only {', '.join(f for _, f in APPLIED)} may change on resume; to run the new settings, "
                         f"start another study (--storage elsewhere) or --overwrite this one{hint}")


def check_start(args: argparse.Namespace, recorded: dict | None, new: dict, study_dir: str, uri: str) -> str:
    """Refuse to start over a study without --overwrite, or to resume one that the new flags would change;
    returns the MLflow URI to log to (a resume keeps the study's own unless --mlflow-uri moves it)."""
    if not args.resume:
        if recorded is not None and not args.overwrite:
            raise FileExistsError(f"--storage {args.storage}: {study_dir} already holds a study: pass --resume to "
                                  "continue it, --overwrite to start over, or another --storage")
        return uri
    check_resume(recorded, new, study_dir)
    if recorded.get("state") == "finished":
        log.info("%s had finished: --resume reruns nothing and prints its table again", study_dir)
    if args.mlflow_uri:
        return uri
    if MASK in (recorded.get("mlflow_uri") or ""):
        raise UsageError(f"--resume: the study logs to {recorded['mlflow_uri']}, recorded without its password: pass "
                         "--mlflow-uri with it again (or keep it in PGPASSWORD / ~/.pgpass and out of the URI)")
    return recorded.get("mlflow_uri") or uri


def remove_failed_start(study_dir: str, fresh: bool, err: BaseException) -> bool:
    """A start that failed before any trial reported leaves no folder (or S3 prefix) that would block the
    corrected command; returns whether it removed it."""
    if fresh and not isinstance(err, StudyInterrupted) and not has_trial_results(study_dir):
        remove_study(study_dir)
        return True
    return False


def updated(recorded: dict | None, new: dict, entry: dict) -> dict:
    """The study.json to write: the definition, the current MLflow URI (analysis reads it), the history."""
    history = list((recorded or {}).get("invocations") or [])
    if recorded and not history and recorded.get("argv"):  # a study.json written before the history existed
        history.append({"argv": recorded["argv"], "mlflow_uri": recorded.get("mlflow_uri"), "state": "unknown"})
    return {**new, "mlflow_uri": entry["mlflow_uri"], "argv": entry["argv"],
            "state": entry["state"], "invocations": [*history, entry]}


def write_file(path: str, text: str) -> None:
    """Write beside Tune's results, on a local disk or in S3/GCS alike (pyarrow, as Tune itself)."""
    from pyarrow import fs

    filesystem, fs_path = fs.FileSystem.from_uri(path if "://" in path else Path(path).resolve().as_uri())
    filesystem.create_dir(fs_path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(fs_path) as stream:
        stream.write(text.encode())


def read_record(study_dir: str) -> dict | None:
    """The study's study.json, or None when the folder holds no study."""
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(f"{study_dir}/study.json" if "://" in study_dir
                                              else Path(study_dir, "study.json").as_uri())
    if filesystem.get_file_info(path).type != fs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        return json.loads(stream.read().decode())


def snapshot_statuses(study_dir: str) -> dict[str, str]:
    """Trial folder -> status in Tune's newest experiment snapshot (see ``analysis/ray_internals.py``)."""
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(study_dir if "://" in study_dir else Path(study_dir).as_uri())
    found = sorted(info.path for info in filesystem.get_file_info(fs.FileSelector(path))
                   if fnmatch.fnmatch(info.base_name, SNAPSHOT_GLOB))
    if not found:
        return {}
    with filesystem.open_input_stream(found[-1]) as stream:
        return parse_snapshot(stream.read().decode())
