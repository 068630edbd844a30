"""The report's two pages: ``index.html`` (open in a browser) and ``report.md`` (renders on GitHub/MLflow)."""
from __future__ import annotations

import html
import math
from datetime import datetime
from pathlib import Path

import pandas as pd

from analysis.report import Report
from analysis.tables import RATES, fmt, short_id

STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}tr.best td{font-weight:bold;background:#fff6d5}tr.error td{color:#a00}
figure{margin:1.5em 0}img{max-width:100%;border:1px solid #eee}figcaption{font-size:14px;color:#444;margin-top:.4em}
code{background:#f3f3f3;padding:0 3px}"""


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
    facts = [("study folder", study.location), ("task", study.task), ("selection", f"{study.metric} ({study.mode})"),
             ("trials", f"{len(report.table)} ({int(report.table['status'].eq('OK').sum())} OK)"),
             ("MLflow", study.mlflow_uri or "-"), ("built", datetime.now().isoformat(timespec="seconds"))]
    return title, facts


def write_html(report: Report) -> Path:
    title, facts = _header(report)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>", "<ul>"]
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
    path = report.out / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def write_markdown(report: Report) -> Path:
    title, facts = _header(report)
    lines = [f"# {title}", ""] + [f"- {k}: `{v}`" for k, v in facts] + [""]
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
    path = report.out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
