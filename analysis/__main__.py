"""``python -m analysis STUDY_DIR``: the report's table and figures for one study, in STUDY_DIR/report/.

    python -m analysis results/seg_optimizers                       # MLflow URI from study.json
    python -m analysis s3://bucket/vt/seg_optimizers                # from the bucket, to ./report/seg_optimizers
    python -m analysis results/seg_optimizers --mlflow-uri sqlite:////abs/mlflow.db
    python -m analysis results/vae_latent --no-mlflow --tsne-perplexity 20
    python -m analysis results/seg_search --watch                   # rewritten every 5 s while the study runs
    python -m analysis results                                      # every study's page, and results/index.html
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Callable

from analysis.html import write_html, write_markdown
from analysis.importance import EVALUATORS
from analysis.index import Row, find_studies, stale, study_row, write_index
from analysis.load import Study, load_study
from analysis.progress import UNFINISHED, describe
from analysis.publish import log_report
from analysis.remote import is_uri, local_study
from analysis.report import build_report, report_folder
from analysis.watch import watch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study_dir", help="a study's folder or URI, <storage>/<study name> (holds study.json); or a "
                        "storage folder or URI of studies: each study's page, and an index page over them")
    parser.add_argument("--out", help="output folder (default: STUDY_DIR/report; ./report/<study name> for a URI; "
                        "for a storage: the storage folder, ./report for a URI, study pages in OUT/<study name>)")
    parser.add_argument("--mlflow-uri", help="where to log the report run (default: the study's, from study.json)")
    parser.add_argument("--no-mlflow", action="store_true", help="write the files only")
    parser.add_argument("--tsne-perplexity", type=float, help="default: min(30, (n - 1) / 3) for n samples")
    parser.add_argument("--include-unfinished", action="store_true",
                        help="rank interrupted or running trials too, on their last epoch (default: finished only)")
    parser.add_argument("--importance", choices=EVALUATORS, default="fanova",
                        help="Optuna's hyperparameter importance evaluator (default: fanova)")
    parser.add_argument("--watch", action="store_true", help="rewrite the page every --watch-interval seconds while "
                        "the study runs (the page says it is live); ends when study.json says it ended, or on Ctrl-C")
    parser.add_argument("--watch-interval", type=float, default=5.0, metavar="S", help="default: 5")
    parser.add_argument("--rebuild", action="store_true",
                        help="for a storage: rebuild every study's page, not only those older than their results")
    args = parser.parse_args(argv)
    if args.watch_interval <= 0:
        parser.error(f"--watch-interval: got {args.watch_interval}; give seconds > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)

    try:
        studies = find_studies(args.study_dir)
    except (OSError, ValueError) as err:  # an unreachable endpoint, a missing bucket, a malformed URI
        print(f"error: {err}", file=sys.stderr)
        return 2
    if studies and args.watch:
        print(f"error: --watch takes one study's folder; {args.study_dir} holds {len(studies)} studies",
              file=sys.stderr)
        return 2
    if studies:
        return write_storage_index(args, studies, progress)
    if args.watch:
        return watch(args, progress, write_report)
    with contextlib.ExitStack() as stack:
        try:
            if is_uri(args.study_dir):
                progress(f"copying {args.study_dir}'s records and last artifacts (not its checkpoints' weights)")
            study = load_study(stack.enter_context(local_study(args.study_dir)))
        except (OSError, ValueError) as err:  # OSError: an unreachable endpoint or a missing bucket too
            print(f"error: {err}", file=sys.stderr)
            return 2
        if is_uri(args.study_dir):
            study.source = args.study_dir
        return write_report(args, study, progress)


def write_report(args: argparse.Namespace, study: Study, progress: Callable[[str], None], out: Path | None = None,
                 live: float | None = None, projections: dict | None = None) -> int:
    """Write the study's report and log it to MLflow; prints where it is. ``live``: a --watch page's interval (the
    page says it is live; quiet, and not logged to MLflow until the last one)."""
    ok = int(study.trials["status"].eq("OK").sum())
    say = (lambda message: None) if live else progress
    say(f"study {study.name} ({study.task}): {len(study.trials)} trial(s), {ok} OK, selected by "
        f"{study.metric} ({study.mode})")
    incomplete = None if study.complete else describe(study.state, study.trials)
    if incomplete:
        say(incomplete)
    if args.include_unfinished:
        study.rankable = ("OK", *UNFINISHED)
    out = out or report_folder(study, args.out)
    report = build_report(study, out, args.tsne_perplexity, say, args.importance, projections)
    if incomplete:
        report.notes.insert(0, incomplete)
    write_markdown(report, live)
    index = write_html(report, live)
    if live:
        progress(f"live page: {len(study.trials)} trial(s), {ok} OK; {index}")
        return 0
    for note in report.notes:
        progress(f"note: {note}")
    uri = args.mlflow_uri or study.mlflow_uri
    if not args.no_mlflow:
        if uri:
            run_id, url = log_report(uri, study.name, out, study.location)
            progress(f"MLflow: report/ of the study's run {run_id} in experiment {study.name} at {uri}")
            progress(f"MLflow runs: {url}")
        else:
            progress("MLflow: no URI in study.json and no --mlflow-uri: not logged")
    progress(f"{len(report.entries)} item(s) written")
    print(f"report: {index}")
    return 0


def write_storage_index(args: argparse.Namespace, studies: list[str], progress: Callable[[str], None]) -> int:
    """Each study's page where it is missing or stale (all with --rebuild), then the index over them."""
    storage = args.study_dir
    out = Path(args.out).resolve() if args.out else (
        Path("report").resolve() if is_uri(storage) else Path(storage).expanduser().resolve())
    progress(f"{len(studies)} studies in {storage}")
    rows = []
    for location in studies:
        name = location.rstrip("/").rsplit("/", 1)[-1]
        try:
            with local_study(location) as path:
                study = load_study(path)
                if is_uri(location):
                    study.source = location
                page_dir = out / study.name if (args.out or study.source) else study.path / "report"
                if args.rebuild or study.source or stale(page_dir / "index.html", study.path):
                    write_report(args, study, progress, page_dir)
                else:
                    progress(f"{study.name}: its page is newer than its results, kept (--rebuild rebuilds it)")
                rows.append(study_row(study, page_dir / "index.html", out))
        except Exception as err:  # noqa: BLE001  one unreadable study (or a failed build) leaves the others' lines
            progress(f"{name}: {err}")
            rows.append(Row(name, location, problem=f"not read: {err}"))
    print(f"index: {write_index(rows, out, storage)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
