"""``python -m analysis STUDY --watch``: the study's page rewritten every few seconds while it runs, as the Optuna
dashboard updates. Each pass rereads the study (its trial folders and Tune's snapshot, as for a running study)
and rewrites the page marked live; once study.json says the study ended (finished, failed, interrupted, or its
driver is gone) one last, ordinary page is written and logged to MLflow. Ctrl-C stops watching and says so on
the page."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Callable

from analysis.html import mark_stopped
from analysis.load import Study, load_study
from analysis.remote import is_uri, local_study
from analysis.report import report_folder

log = logging.getLogger(__name__)
RUNNING = "running"


def watch(args: argparse.Namespace, progress: Callable[[str], None],
          write_report: Callable[..., int], sleep: Callable[[float], None] = time.sleep) -> int:
    """Rewrite the page until the study ends (0, or the last page's exit code) or Ctrl-C (130)."""
    projections: dict = {}  # t-SNE/PCA of checkpoints that did not change since the last pass
    page: Path | None = None
    passes = 0
    progress(f"watching {args.study_dir}: a page every {args.watch_interval:g} s while the study runs (Ctrl-C stops)")
    try:
        while True:
            start, passes = time.monotonic(), passes + 1
            try:
                with local_study(args.study_dir) as path:
                    study = _load(path, args.study_dir)
                    if study is None and passes == 1:
                        progress("no trial to show yet: waiting for the first")
                    elif study is not None and study.state != RUNNING:
                        progress(f"the study is {study.state}: the last page")
                        return write_report(args, study, progress, projections=projections)
                    elif study is not None:
                        code = write_report(args, study, progress, live=args.watch_interval, projections=projections)
                        page = report_folder(study, args.out) / "index.html"
                        if code:
                            return code
            except FileNotFoundError as err:
                if passes == 1:  # no study.json: a wrong folder, not a study yet to start
                    print(f"error: {err}", file=sys.stderr)
                    return 2
                log.info("%s: %s", args.study_dir, err)  # a file removed while read: the next pass reads again
            sleep(max(0.0, args.watch_interval - (time.monotonic() - start)))
    except KeyboardInterrupt:
        if page is not None and mark_stopped(page):
            progress(f"stopped watching; {page} says it is no longer live")
        return 130

def _load(path: Path, location: str) -> Study | None:
    """The study as it is now; None while it has no trial to show (a study starting)."""
    try:
        study = load_study(path)
    except ValueError as err:  # no trials yet, or a file caught mid-write: the next pass reads it again
        log.info("%s: %s", location, err)
        return None
    if is_uri(location):
        study.source = location
    return study

