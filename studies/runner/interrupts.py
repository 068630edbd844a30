"""Ctrl-C and SIGTERM: the first one stops the study the way Tune stops on Ctrl-C, the second at once.

Tune 2.60's ``fit()`` catches SIGINT itself (and SIGUSR1, always): it stops the trials, saves the
experiment state and returns a ResultGrid as if the study had ended, with no sign that it was cut short.
SIGTERM (``kill``, Kubernetes, Slurm) it leaves to Python's default, which ends the driver before
``ray.shutdown()`` and leaves Ray's processes behind. So both signals come here: we record which one
arrived and, inside ``fit()``, hand it to Tune's own stop handler (the one on SIGUSR1); outside it, or the
second time, we raise ``Stopped`` so that the runner's ``finally`` still shuts Ray down. The runner calls
``install`` again after ``ray.init``, which replaces the driver's SIGTERM handler with its own.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from analysis.ray_internals import TUNE_SIGINT_VARIABLE, TUNE_STOP_SIGNAL

log = logging.getLogger("vision_tune")
SIGNALS = (signal.SIGINT, signal.SIGTERM)
TUNE_STOP = TUNE_STOP_SIGNAL  # Tune's fit() installs its stop handler here too
_TUNE_SIGINT = TUNE_SIGINT_VARIABLE  # so that Ctrl-C reaches our handler, not only Tune's


class Stopped(KeyboardInterrupt):
    """A stop signal that arrived where Tune could not save the study's state (or a second one)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """Which stop signal arrived (``signum``, None if none) and whether ``fit()`` is running."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.in_fit = False
        self.fitted = False  # fit() returned: Tune's state is saved, only Ray's shutdown is left

    def handle(self, signum: int, frame) -> None:
        first = self.signum is None
        self.signum = self.signum or signum
        tune_stop = signal.getsignal(TUNE_STOP) if TUNE_STOP else None
        if first and self.in_fit and callable(tune_stop):
            log.warning("%s: stopping the trials and saving the study's state (send it again to stop at once)",
                        signal.Signals(signum).name)
            tune_stop(TUNE_STOP, frame)
            return
        if first and self.fitted:
            log.warning("%s: the trials have ended and the study's state is saved; writing its table first (send "
                        "it again to stop at once)", signal.Signals(signum).name)
            return
        raise Stopped(signum)

    def install(self) -> None:
        """(Again) make ``handle`` the process's handler: ``ray.init`` puts a C++ failure handler on SIGTERM in
        the driver, which prints a stack and aborts (-6) without Python ever seeing the signal."""
        if threading.current_thread() is not threading.main_thread():
            return  # Python takes handlers in the main thread only; a study run from a thread keeps the defaults
        for sig in SIGNALS:
            signal.signal(sig, self.handle)

    @contextmanager
    def fitting(self) -> Iterator[None]:
        """Around ``tuner.fit()``: signals go to Tune's stop handler, which is removed again afterwards."""
        self.install()
        before = signal.getsignal(TUNE_STOP) if TUNE_STOP else None
        self.in_fit = True
        try:
            yield
            self.fitted = True
        finally:
            self.in_fit = False
            if TUNE_STOP and before is not None and threading.current_thread() is threading.main_thread():
                signal.signal(TUNE_STOP, before)  # Tune leaves its handler behind, with a stale event


@contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """Catch SIGINT and SIGTERM for the duration of a study (main thread only; elsewhere a no-op)."""
    state = StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    state.install()
    env_before = os.environ.get(_TUNE_SIGINT)
    os.environ[_TUNE_SIGINT] = "1"
    try:
        yield state
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: one set outside Python
        if env_before is None:
            os.environ.pop(_TUNE_SIGINT, None)
        else:
            os.environ[_TUNE_SIGINT] = env_before
