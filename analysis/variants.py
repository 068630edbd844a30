"""Answers with error bars: per variant mean ± std (n) over seeds, the difference of each to the best with a
95% interval, and the report's finding judged on the study (the judgement itself is ``analysis.finding``)."""
from __future__ import annotations

import html
import math

import pandas as pd

from analysis.load import Study
from analysis.tables import METRICS, RATES, label_trials
from analysis.finding import Finding, Verdict, judge
from analysis.stats import METHOD, welch_interval


def _ok(study: Study) -> pd.DataFrame:
    trials = label_trials(study.trials)
    return trials[trials["status"].eq("OK")]


def variant_table(study: Study) -> pd.DataFrame:
    """One row per variant (letter order): setting, n, seeds, mean and std of every final metric, and for the
    study's metric the difference to the best variant by mean with its Welch interval."""
    trials = _ok(study)
    metrics = [m for m in METRICS.get(study.task, METRICS["segmentation"]) if m in trials and trials[m].notna().any()]
    rows = []
    for variant, group in trials.groupby("variant", sort=False):
        row = {"variant": variant, "setting": group["setting"].iloc[0], "n": len(group),
               "seeds": ", ".join(str(int(s)) for s in group["config/seed"]) if "config/seed" in group else "-"}
        for metric in metrics:
            values = pd.to_numeric(group[metric], errors="coerce").dropna()
            row[f"{metric} mean"] = values.mean() if len(values) else math.nan
            row[f"{metric} std"] = values.std(ddof=1) if len(values) > 1 else math.nan
        row["_values"] = pd.to_numeric(group.get(study.metric), errors="coerce").dropna().to_numpy()
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty or f"{study.metric} mean" not in table:
        return table.drop(columns="_values", errors="ignore")
    table = table.sort_values("variant", key=lambda s: s.map(lambda v: (len(v), v))).reset_index(drop=True)
    means = table[f"{study.metric} mean"]
    best = means.idxmax() if study.mode == "max" else means.idxmin()
    table["best"] = table.index == best
    intervals = [welch_interval(values, table.loc[best, "_values"]) for values in table["_values"]]
    table["diff to best"] = [means[i] - means[best] for i in table.index]
    table["low"] = [iv.low if iv and i != best else math.nan for i, iv in zip(table.index, intervals)]
    table["high"] = [iv.high if iv and i != best else math.nan for i, iv in zip(table.index, intervals)]
    table["excludes 0"] = [None if i == best or iv is None else iv.excludes_zero
                           for i, iv in zip(table.index, intervals)]
    return table.drop(columns="_values")


def _value(metric: str, value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.2f}%" if metric in RATES else f"{value:.4g}"


def variant_rows(table: pd.DataFrame, study: Study) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the variant table as text (shared by markdown and HTML)."""
    metrics = [c.removesuffix(" mean") for c in table.columns if c.endswith(" mean")]
    header = ["variant", "setting", "n", *metrics, f"{study.metric} − best, 95% interval", "excludes 0"]
    rows = []
    for _, row in table.iterrows():
        cells = [row["variant"] + (" ★" if row["best"] else ""), row["setting"], str(row["n"])]
        for metric in metrics:
            mean, std = row[f"{metric} mean"], row[f"{metric} std"]
            spread = "" if math.isnan(std) else f" ± {_value(metric, std)}"
            cells.append(f"{_value(metric, mean)}{spread}")
        if row["best"]:
            cells += ["best by mean", ""]
        elif math.isnan(row["low"]):
            cells += [f"{_value(study.metric, row['diff to best'])}; n=1: no interval", ""]
        else:
            cells += [f"{_value(study.metric, row['diff to best'])} [{_value(study.metric, row['low'])}, "
                      f"{_value(study.metric, row['high'])}]", "yes" if row["excludes 0"] else "no"]
        rows.append(cells)
    return header, rows


def variant_markdown(table: pd.DataFrame, study: Study) -> str:
    header, rows = variant_rows(table, study)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + f"\n\nMean ± std over seeds (n = OK trials); interval: {METHOD}.\n"


def variant_html(table: pd.DataFrame, study: Study) -> str:
    header, rows = variant_rows(table, study)
    lines = ["<table>", "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in header) + "</tr>"]
    for cells, best in zip(rows, table["best"]):
        lines.append(f'<tr class="{"best" if best else ""}">' + "".join(f"<td>{html.escape(c)}</td>" for c in cells)
                     + "</tr>")
    return "\n".join(lines + ["</table>"])


def study_verdict(study: Study) -> Verdict | None:
    """The study's finding (from study.json) judged on its trials; None for a study that states none."""
    return judge(Finding.from_dict(study.finding), study.trials) if study.finding else None


def letters_of(study: Study, verdict: Verdict) -> str:
    """'A = skip_concat=True; B = skip_concat=False': the table's letters of the variants the verdict compared."""
    variant = dict(zip(study.trials["trial"], label_trials(study.trials)["variant"]))
    named = {variant[trials[0]]: key for key, trials in verdict.compared.items() if trials and trials[0] in variant}
    return "; ".join(f"{letter} = {key}" for letter, key in sorted(named.items(), key=lambda kv: (len(kv[0]), kv[0])))


def finding_markdown(verdict: Verdict, letters: str = "") -> str:
    finding = verdict.finding
    compared = f"\n\nVariants compared: {letters}." if letters else ""
    notes = "".join(f"\n{line[0].upper()}{line[1:]}.\n" for line in verdict.notes())  # min. difference, left out
    return (f"**The report's claim** (section {finding.section}): {finding.claim} "
            f"(judged on {finding.metric}).\n\n**Measured here:** {verdict.measured}.{compared}\n\n"
            f"**Verdict: {verdict.verdict}** (n={verdict.n} seed(s) per variant at least; {verdict.method}).\n{notes}")


def finding_html(verdict: Verdict, letters: str = "") -> str:
    finding = verdict.finding
    compared = f"<p>Variants compared: {html.escape(letters)}.</p>" if letters else ""
    notes = "".join(f"<p>{html.escape(line[0].upper() + line[1:])}.</p>" for line in verdict.notes())
    return (f"<p><b>The report's claim</b> (section {html.escape(finding.section)}): {html.escape(finding.claim)} "
            f"(judged on <code>{html.escape(finding.metric)}</code>).</p><p><b>Measured here:</b> "
            f"{html.escape(verdict.measured)}.</p>{compared}<p><b>Verdict: {html.escape(verdict.verdict)}</b> "
            f"(n={verdict.n} seed(s) per variant at least; {html.escape(verdict.method)}).</p>{notes}")
