"""The index page over every study in a storage folder: each study's question, state, verdict, best variant and
metric, and a link to its own page. ``python -m analysis STORAGE`` writes it (``STORAGE/index.html``, or
``./report/index.html`` for an ``s3://`` storage) after building the page of every study that has none or whose
page is older than its results."""
from __future__ import annotations

import ast
import html
import json
import math
import os
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd

from analysis.html import STYLE
from analysis.load import Study
from analysis.remote import is_uri
from analysis.tables import RATES, ranked
from analysis.variants import study_verdict, variant_table

INPUTS = ("study.json", "trials.csv", "finding.json", "*/result.json")  # what a study's page is drawn from


def find_studies(location: str) -> list[str]:
    """The studies directly under a storage folder or URI (their folders or URIs, by name); [] for a study itself."""
    if is_uri(location):
        from pyarrow import fs

        filesystem, root = fs.FileSystem.from_uri(location.rstrip("/"))
        if filesystem.get_file_info(f"{root}/study.json").type == fs.FileType.File:
            return []
        children = filesystem.get_file_info(fs.FileSelector(root, allow_not_found=True))
        folders = [info.base_name for info in children if info.type == fs.FileType.Directory]
        return [f"{location.rstrip('/')}/{name}" for name in sorted(folders)
                if filesystem.get_file_info(f"{root}/{name}/study.json").type == fs.FileType.File]
    path = Path(location).expanduser()
    if (path / "study.json").is_file() or not path.is_dir():
        return []
    return [str(child) for child in sorted(path.iterdir()) if (child / "study.json").is_file()]


def stale(page: Path, study: Path) -> bool:
    """Whether the study's page is missing or older than any file it is drawn from."""
    if not page.is_file():
        return True
    written = page.stat().st_mtime
    return any(source.stat().st_mtime > written for pattern in INPUTS for source in study.glob(pattern))


def question(info: dict) -> str:
    """The study's question: study.json's ``question``, else the first paragraph of its script's docstring (when the
    script is where the command ran it), else its finding's claim."""
    if info.get("question"):
        return str(info["question"])
    argv = info.get("argv") or []
    if argv and str(argv[0]).endswith(".py"):
        cwd = (info.get("invocations") or [{}])[0].get("cwd") or "."
        for script in (Path(cwd) / argv[0], Path(argv[0])):
            try:
                doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8")))
            except (OSError, SyntaxError, ValueError):
                continue
            if doc:
                return " ".join(doc.split("\n\n")[0].split())
    finding = info.get("finding") or {}
    return f"claim: {finding['claim']}" if finding.get("claim") else "-"


@dataclass
class Row:
    """One study of the index."""

    name: str
    location: str
    question: str = "-"
    state: str = "-"
    trials: str = "-"
    verdict: str = "-"
    best: str = "-"
    metric: str = "-"
    page: str = ""  # link to the study's page, relative to the index
    problem: str = ""


def _value(metric: str, value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.2f}%" if metric in RATES else f"{value:.4g}"


def study_row(study: Study, page: Path | None, index_dir: Path) -> Row:
    """The study's line: a variant is best by its mean over seeds (as the page's variant table), else by its trial."""
    info = json.loads((study.path / "study.json").read_text())
    ok = int(study.trials["status"].eq("OK").sum())
    row = Row(study.name, study.location, question(info), study.state, f"{ok} OK of {len(study.trials)}")
    verdict = study_verdict(study)
    row.verdict = verdict.verdict if verdict else "no claim stated"
    variants = variant_table(study)
    if "best" in variants and variants["best"].any():
        best = variants[variants["best"]].iloc[0]
        row.best = f"{best['variant']}: {best['setting']}"
        row.metric = (f"{study.metric} {_value(study.metric, best[f'{study.metric} mean'])} "
                      f"({'mean of ' + str(best['n']) if best['n'] > 1 else 'one trial'}, {study.mode})")
    else:
        trials = ranked(study)
        if trials["best"].any():
            best = trials[trials["best"]].iloc[0]
            row.best = f"{best['label']}: {best['setting']}"
            row.metric = f"{study.metric} {_value(study.metric, best[study.metric])} ({study.mode})"
    if page is not None and page.is_file():
        row.page = Path(os.path.relpath(page, index_dir)).as_posix()
    return row


def write_index(rows: list[Row], out: Path, storage: str) -> Path:
    """index.html (a row per study, linked to its page) and studies.csv beside it."""
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([asdict(row) for row in rows]).to_csv(out / "studies.csv", index=False)
    header = ["study", "question", "state", "trials", "verdict", "best variant", "metric"]
    lines = [f"<!doctype html><html><head><meta charset='utf-8'><title>Studies in {html.escape(storage)}</title>",
             f"<style>{STYLE}\ntd{{text-align:left;vertical-align:top}}</style></head><body>",
             f"<h1>Studies in <code>{html.escape(storage)}</code></h1>",
             f"<p>{len(rows)} studies; written {datetime.now().isoformat(timespec='seconds')}. Verdicts judge each "
             "study's claim on its OK trials; a best variant is best by its mean over seeds. Data: "
             "<a href='studies.csv'>studies.csv</a>.</p>", "<table>",
             "<tr>" + "".join(f"<th>{name}</th>" for name in header) + "</tr>"]
    for row in rows:
        name = (f"<a href='{html.escape(row.page)}'>{html.escape(row.name)}</a>" if row.page
                else html.escape(row.name))
        cells = [name, row.question, row.state, row.trials, row.verdict, row.best, row.metric]
        cells = [cells[0], *(html.escape(c) for c in cells[1:])]
        if row.problem:
            cells[1] = f"<span style='color:#a00'>{html.escape(row.problem)}</span>"
        lines.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    lines += ["</table>", "</body></html>"]
    path = out / "index.html"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
