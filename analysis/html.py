"""The report's two pages: ``index.html`` (open in a browser) and ``report.md`` (renders on GitHub/MLflow)."""
from __future__ import annotations

import html
import math
import os
import re
from datetime import datetime
from pathlib import Path

import pandas as pd

from analysis.report import Report
from analysis.tables import RATES, fmt, short_id

STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}tr.best td{font-weight:bold;background:#fff6d5}tr.error td{color:#a00}
figure{margin:1.5em 0}img{max-width:100%;border:1px solid #eee}figcaption{font-size:14px;color:#444;margin-top:.4em}
code{background:#f3f3f3;padding:0 3px}.live{background:#e7f6e7;border:1px solid #7c7;padding:.5em 1em}
.stopped{background:#f6f0e0;border:1px solid #cb8;padding:.5em 1em}"""
# the live banner and the reload between these markers, so that a stopped --watch can take them out again
LIVE = re.compile(r"<!--live-->.*?<!--/live-->", re.S)


def _cell(column: str, value) -> str:
    if column == "trial":
        return short_id(value)
    if column in RATES and isinstance(value, float) and not math.isnan(value):
        return f"{100 * value:.2f}%"
    if column in ("rank", "epoch") and not pd.isna(value):
        return str(int(value))
    return fmt(value)


def table_html(table: pd.DataFrame) -> str:
    """The results table; best row highlighted, failed trials in red with their error below."""
    shown = [c for c in table.columns if c not in ("best", "error")]
    lines = ["<table>", "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in shown) + "</tr>"]
    for _, row in table.iterrows():
        kind = "best" if row.get("best") else "error" if row.get("status") != "OK" else ""
        cells = [html.escape(_cell(c, row[c])) + (" ★" if c == "label" and kind == "best" else "") for c in shown]
        lines.append(f'<tr class="{kind}">' + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
        if kind == "error" and isinstance(row.get("error"), str):
            lines.append(f'<tr class="error"><td colspan="{len(shown)}" style="text-align:left">'
                         f"{html.escape(row['error'])}</td></tr>")
    return "\n".join(lines + ["</table>"])


def _header(report: Report) -> tuple[str, list[tuple[str, str]]]:
    study = report.study
    title = f"Study {study.name}"
    facts = [("study folder", study.location), ("task", study.task), ("state", study.state),
             ("selection", f"{study.metric} ({study.mode})"),
             ("trials", f"{len(report.table)} ({int(report.table['status'].eq('OK').sum())} OK)"),
             ("MLflow", study.mlflow_uri or "-"), ("built", datetime.now().isoformat(timespec="seconds"))]
    return title, facts


def _replace(path: Path, text: str) -> Path:
    """Write through a temporary file: a browser reloading a --watch page never reads half of one."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return path


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


def write_html(report: Report, live: float | None = None) -> Path:
    """index.html; ``live``: the seconds between rewrites of a page that --watch keeps rewriting (it reloads itself
    as often and says it is live and when it was written)."""
    title, facts = _header(report)
    reload = (f"<!--live--><meta http-equiv='refresh' content='{max(1, round(live))}'><!--/live-->"
              if live else "")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{reload}",
             f"<style>{STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    if live:
        parts.append(f"<!--live--><p class='live'><b>LIVE</b>: the study is running; this page is rewritten every "
                     f"{live:g} s and reloads itself. Written at {_now()}.</p><!--/live-->")
    parts.append("<ul>")
    parts += [f"<li>{html.escape(k)}: <code>{html.escape(v)}</code></li>" for k, v in facts]
    parts.append("</ul>")
    section = None
    for entry in report.entries:
        if entry.section != section:
            section = entry.section
            parts.append(f"<h2>{html.escape(section)}</h2>")
        if entry.html:  # a text entry with its own HTML (the Finding, the variants over seeds)
            parts.append(entry.html)
            parts.append(f"<p><em>{html.escape(entry.caption)}</em></p>")
            continue
        if entry.path.endswith(".md"):
            parts.append(table_html(report.table))
            parts.append(f"<p><em>{html.escape(entry.caption)}</em> Files: <a href='table.csv'>table.csv</a>, "
                         f"<a href='{entry.path}'>{entry.path}</a>.</p>")
            continue
        parts.append(f"<figure><a href='{html.escape(entry.path)}'><img src='{html.escape(entry.path)}' "
                     f"alt='{html.escape(entry.title)}'></a><figcaption><b>{html.escape(entry.title)}.</b> "
                     f"{html.escape(entry.caption)}</figcaption></figure>")
    if report.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in report.notes) + "</ul>")
    parts.append("</body></html>")
    return _replace(report.out / "index.html", "\n".join(parts))


def mark_stopped(page: Path) -> bool:
    """A live page whose --watch was stopped: its banner says so and it stops reloading; False if it was not live."""
    if not page.is_file():
        return False
    text = page.read_text(encoding="utf-8")
    if not LIVE.search(text):
        return False
    banner = (f"<p class='stopped'><b>Not live</b>: watching stopped at {_now()}; the study may have moved on since "
              "this page was written (run python -m analysis again).</p>")
    head, _, body = text.partition("<body>")
    _replace(page, LIVE.sub("", head) + "<body>" + LIVE.sub(lambda _: banner, body, count=1))
    return True


def write_markdown(report: Report, live: float | None = None) -> Path:
    title, facts = _header(report)
    lines = [f"# {title}", ""]
    if live:
        lines += [f"> **LIVE**: the study is running; `--watch` rewrites this page every {live:g} s. Written at "
                  f"{_now()}.", ""]
    lines += [f"- {k}: `{v}`" for k, v in facts] + [""]
    section = None
    for entry in report.entries:
        if entry.section != section:
            section = entry.section
            lines += [f"## {section}", ""]
        if entry.path.endswith(".md"):
            lines += [(report.out / entry.path).read_text(), f"*{entry.caption}*", ""]
        else:
            lines += [f"![{entry.title}]({entry.path})", "", f"*{entry.title}.* {entry.caption}", ""]
    if report.notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in report.notes] + [""]
    return _replace(report.out / "report.md", "\n".join(lines))
