"""``python -m analysis STUDY_DIR``: the report's table and figures for one study, in STUDY_DIR/report/.

    python -m analysis results/seg_optimizers                       # MLflow URI from study.json
    python -m analysis s3://bucket/vt/seg_optimizers                # from the bucket, to ./report/seg_optimizers
    python -m analysis results/seg_optimizers --mlflow-uri sqlite:////abs/mlflow.db
    python -m analysis results/vae_latent --no-mlflow --tsne-perplexity 20
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Callable

from analysis.html import write_html, write_markdown
from analysis.load import Study, load_study
from analysis.progress import UNFINISHED, describe
from analysis.publish import log_report
from analysis.remote import is_uri, local_study
from analysis.report import build_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study_dir", help="a study's folder or URI, <storage>/<study name> (holds study.json)")
    parser.add_argument("--out", help="output folder (default: STUDY_DIR/report; ./report/<study name> for a URI)")
    parser.add_argument("--mlflow-uri", help="where to log the report run (default: the study's, from study.json)")
    parser.add_argument("--no-mlflow", action="store_true", help="write the files only")
    parser.add_argument("--tsne-perplexity", type=float, help="default: min(30, (n - 1) / 3) for n samples")
    parser.add_argument("--include-unfinished", action="store_true",
                        help="rank interrupted or running trials too, on their last epoch (default: finished only)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)

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


def write_report(args: argparse.Namespace, study: Study, progress: Callable[[str], None]) -> int:
    """Write the study's report and log it to MLflow; prints where it is."""
    ok = int(study.trials["status"].eq("OK").sum())
    progress(f"study {study.name} ({study.task}): {len(study.trials)} trial(s), {ok} OK, selected by "
             f"{study.metric} ({study.mode})")
    incomplete = None if study.complete else describe(study.state, study.trials)
    if incomplete:
        progress(incomplete)
    if args.include_unfinished:
        study.rankable = ("OK", *UNFINISHED)
    out = Path(args.out).resolve() if args.out else (
        Path("report", study.name).resolve() if study.source else study.path / "report")
    report = build_report(study, out, args.tsne_perplexity, progress)
    if incomplete:
        report.notes.insert(0, incomplete)
    write_markdown(report)
    index = write_html(report)
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


if __name__ == "__main__":
    sys.exit(main())
