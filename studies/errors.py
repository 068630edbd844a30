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

from studies.preflight import PendingTimeoutError, ResourceError, StorageError
from trainables import ConfigError

DEBUG_ENV = "VISION_TUNE_DEBUG"
USAGE, FAILURE = 2, 1  # argparse's own code for a bad flag is 2 as well

# config fields the command line sets directly: an error about the field names the flag the user typed
FIELD_FLAGS = {"epochs": "--epochs", "batch_size": "--batch-size", "image_size": "--image-size",
               "steps_per_epoch": "--steps-per-epoch", "seed": "--seed", "dataset": "--dataset",
               "data_root": "--data-root"}


class UsageError(ValueError):
    """A flag, or a combination of flags, that cannot work; the message starts with the flag as typed."""


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


def translate(err: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an exception that reached the command line."""
    if isinstance(err, PendingTimeoutError):  # the request was possible; the cluster did not deliver in time
        return FAILURE, str(err)
    if isinstance(err, (UsageError, ConfigError, ResourceError, StorageError, FileExistsError)):
        return USAGE, str(err)
    if isinstance(err, (FileNotFoundError, NotADirectoryError, PermissionError, ConnectionError)):
        return USAGE, str(err)  # the pre-flight checks name the flag whose path or server is wrong
    module, name = type(err).__module__, type(err).__name__
    first = (str(err).strip().splitlines() or [""])[0]
    if module.startswith("mlflow"):
        return FAILURE, f"MLflow ({name}): {first} (check --mlflow-uri)"
    if module.startswith("ray"):
        if re.search(r"connect|GCS|running Ray instance", str(err), re.I):
            return FAILURE, f"Ray: {first} (check --address, or drop it to start a local Ray)"
        return FAILURE, f"Ray ({name}): {first}"
    return FAILURE, f"{name}: {first}" if first else name


@contextmanager
def cli_errors(argv: list[str]) -> Iterator[None]:
    """Turn what escapes a study into ``error: ...`` on stderr and ``sys.exit(code)``: 2 usage, 1 failure,
    128 + signal number after an interruption (130 Ctrl-C, 143 SIGTERM)."""
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
        hint = "" if debug else f" (traceback: --debug or {DEBUG_ENV}=1)" if code == FAILURE else ""
        print(f"error: {message}{hint}", file=sys.stderr)
        sys.exit(code)
