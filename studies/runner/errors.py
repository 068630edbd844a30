"""How a study's command line fails: one or two lines on stderr, an exit code a shell can act on.

Library callers (tests, notebooks) of ``run_study(..., argv=[...])`` get the exceptions themselves; a study
script run from the shell (``argv`` left to ``sys.argv``) goes through ``cli_errors``. The traceback is
shown only with ``--debug`` or ``VISION_TUNE_DEBUG=1``.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import sys
import traceback
from contextlib import contextmanager
from typing import Iterator

from studies.runner.preflight import PendingTimeoutError, ResourceError, StorageError
from trainables import ConfigError
from trainables.data import BadDataError

DEBUG_ENV = "VISION_TUNE_DEBUG"
# exit codes (README, "Exit codes"): argparse's own code for a bad flag is 2 as well; 128 + N after signal N
FAILURE, USAGE, TRIALS_FAILED, TRACKING_INCOMPLETE = 1, 2, 3, 4
MAX_LINES = 14  # of a message shown on the command line; the rest is counted, and --debug shows it all
# the last line of a traceback that names the exception: "pkg.module.SomeError: message"
EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Interrupt|Exit)(?:\(.*\))?: ")

# config fields the command line sets directly: an error about the field names the flag the user typed
FIELD_FLAGS = {"epochs": "--epochs", "batch_size": "--batch-size", "image_size": "--image-size",
               "steps_per_epoch": "--steps-per-epoch", "seed": "--seed", "dataset": "--dataset",
               "data_root": "--data-root", "checkpoint_every": "--checkpoint-every"}


# user:password@ in a URI (a postgresql:// store, an http:// server behind basic auth)
SECRET = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]+)@", re.I)
MASK = "***"


def redact(text: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``: what the console, study.json and
    MLflow params show (keep passwords in PGPASSWORD or ~/.pgpass to resume without typing them again)."""
    return SECRET.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)


class UsageError(ValueError):
    """A flag, or a combination of flags, that cannot work; the message starts with the flag as typed."""


class TrialsFailed(RuntimeError):
    """The study ran to its end, but some trials failed: everything is written, and the exit code says so."""

    def __init__(self, failed: list[str], total: int, study_dir: str) -> None:
        where = f"{study_dir}/{failed[0]}/error.txt" + (f" (and {len(failed) - 1} more trial folders)"
                                                          if len(failed) > 1 else "")
        super().__init__(f"{len(failed)} of {total} trial(s) failed; their errors are in {study_dir}/trials.csv "
                         f"(column 'error') and in full in {where}")
        self.failed, self.total = failed, total


class TrackingIncomplete(RuntimeError):
    """Every trial finished and the results are complete, but MLflow stayed away: some runs lack records."""

    def __init__(self, trials: list[str], command: str) -> None:
        super().__init__(f"the results are complete, but MLflow lacks the records of {len(trials)} trial run(s) and "
                         f"the study's run; once the server answers, replay them: {command}")


class StudyInterrupted(KeyboardInterrupt):
    """The study was stopped by a signal after Tune saved its state; ``table`` holds the trials as they stood."""

    def __init__(self, signum: int, resume: str, table=None) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum, self.resume, self.table = signum, resume, table


def debug_wanted(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


def flag_for_config_error(err: ConfigError, given: dict) -> str:
    """``epochs: must be ...`` -> ``--epochs 0: must be ... (config field epochs)`` when the flag set the field."""
    text = str(err)
    field = text.split(":", 1)[0].strip()
    flag = FIELD_FLAGS.get(field)
    if flag and given.get(field) is not None:
        return f"{flag} {given[field]}: {text.split(':', 1)[1].strip()} (config field {field})"
    return text


def bounded(text: str, limit: int = MAX_LINES) -> str:
    """The message's first ``limit`` lines (what the user must act on: the files, the flags), then a count."""
    lines = text.strip().splitlines()
    if len(lines) <= limit:
        return "\n".join(lines)
    return "\n".join([*lines[:limit], f"  ... and {len(lines) - limit} more line(s) (--debug shows them all)"])


def exception_message(text: str, limit: int = MAX_LINES) -> str:
    """The message of the last exception in a traceback text (Tune's error of a trial, a worker's error),
    all its lines up to ``limit``: ``BadDataError: ...`` and the files under it, not the traceback's last line."""
    lines = text.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if EXCEPTION_LINE.match(line)]
    return bounded("\n".join(lines[starts[-1]:] if starts else lines[-1:]), limit)


def translate(err: BaseException) -> tuple[int, str]:
    """(exit code, message) for an exception that reached the command line: its first line says what failed,
    the lines under it (bounded) what to act on."""
    if isinstance(err, TrialsFailed):
        return TRIALS_FAILED, str(err)
    if isinstance(err, TrackingIncomplete):
        return TRACKING_INCOMPLETE, str(err)
    if isinstance(err, PendingTimeoutError):  # the request was possible; the cluster did not deliver in time
        return FAILURE, str(err)
    if isinstance(err, BadDataError):  # the files to fix are the message's lines after the first
        return USAGE, f"BadDataError: {bounded(str(err))}"
    if isinstance(err, (UsageError, ConfigError, ResourceError, StorageError, FileExistsError)):
        return USAGE, bounded(str(err))
    if isinstance(err, (FileNotFoundError, NotADirectoryError, PermissionError, ConnectionError)):
        return USAGE, bounded(str(err))  # the pre-flight checks name the flag whose path or server is wrong
    module, name = type(err).__module__, type(err).__name__
    text = str(err).strip()
    if module.startswith("mlflow"):
        first, _, rest = bounded(text).partition("\n")
        return FAILURE, "\n".join(filter(None, [f"MLflow ({name}): {first} (check --mlflow-uri)", rest]))
    if module.startswith("ray"):  # Ray's messages carry a remote traceback: the exception's own lines only
        first = (text.splitlines() or [""])[0]
        if re.search(r"connect|GCS|running Ray instance", text, re.I):
            return FAILURE, f"Ray: {first} (check --address, or drop it to start a local Ray)"
        cause = exception_message(text) if len(text.splitlines()) > 1 else ""
        return FAILURE, "\n".join(filter(None, [f"Ray ({name}): {first}", cause if cause != first else ""]))
    return FAILURE, f"{name}: {bounded(text)}" if text else name


@contextmanager
def cli_errors(argv: list[str]) -> Iterator[None]:
    """Turn what escapes a study into ``error: ...`` on stderr and ``sys.exit(code)``: 2 usage, 1 failure,
    3 trials failed (the study's results are all written), 4 MLflow incomplete (the results are complete; the
    message says how to replay), 128 + signal number after an interruption (130 Ctrl-C,
    143 SIGTERM)."""
    debug = debug_wanted(argv)
    try:
        yield
    except StudyInterrupted as stop:
        print(f"interrupted ({signal.Signals(stop.signum).name}): the study's state is saved; "
              f"continue with:\n  {stop.resume}", file=sys.stderr)
        sys.exit(128 + stop.signum)
    except KeyboardInterrupt as stop:  # a second Ctrl-C, or one before Tune started
        signum = getattr(stop, "signum", signal.SIGINT)
        print(f"interrupted ({signal.Signals(signum).name}) before the study's state was saved", file=sys.stderr)
        sys.exit(128 + signum)
    except Exception as err:  # noqa: BLE001 - the command line's last word on any failure
        code, message = translate(err)
        if debug:
            traceback.print_exc()
        else:
            logging.getLogger("vision_tune").debug("traceback", exc_info=True)
        hint = "" if debug else f"(traceback: --debug or {DEBUG_ENV}=1)" if code == FAILURE else ""
        first, _, rest = redact(message).partition("\n")  # the hint ends the first line, the details follow it
        print(f"error: {first}" + (f" {hint}" if hint else "") + (f"\n{rest}" if rest else ""), file=sys.stderr)
        sys.exit(code)
