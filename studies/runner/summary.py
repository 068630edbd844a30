"""The end of a study: its trials as one table (best first), what the console prints, and the report's claim
judged on the trials."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd

from analysis.finding import UNTESTABLE, Finding, judge
from analysis.naming import VariantNames
from analysis.tables import pareto_front
from analysis.naming import flatten as flat_config
from analysis.tune_state import outcome
from studies.runner.errors import exception_message, redact
from studies.runner.record import write_file
from trainables.tune_io import CHECKPOINT_KEY

SUMMARY_KEYS = ("train/loss", "val/loss", "val/accuracy", "val/precision", "val/recall", "val/miou",
                "val/recon", "val/kl", "val/elbo", "model/params_m", "images_per_s", "epoch")


def summarize(results, metric: str, mode: str, statuses: dict[str, str] | None = None,
              names: VariantNames | None = None, named: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per trial: its name (``C adam lr=0.001``, #k for a variant's k-th seed, as in MLflow and the
    console), the hyperparameters (typed), status, final metrics; best first. ``statuses`` (Tune's snapshot, after
    an interruption) tells finished trials from the ones a stop cut short; ``named``: trial id -> the name the
    console gave it when it started (its first config: PBT changes a trial's config as it trains)."""
    rows, seen = [], {}
    for result in sorted(results, key=lambda r: Path(r.path).name):
        config = flat_config(result.config or {})  # typed: 64, not '64'; False, not 'False'
        folder = Path(result.path).name
        epochs_run = int((result.metrics or {}).get("training_iteration") or 0)
        status = outcome(None if statuses is None else statuses.get(folder, ""), bool(result.error), epochs_run)
        given = (named or {}).get((result.metrics or {}).get("trial_id"))  # as the console named it at its start
        name = names.run_name(config) if names is not None else folder
        seen[name] = seen.get(name, 0) + 1
        name = given or (name if seen[name] == 1 else f"{name} #{seen[name]}")
        row = {"trial": folder, "name": name, "status": status,
               **{f"config/{k}": v for k, v in config.items()},
               **{k: (result.metrics or {}).get(k) for k in (*SUMMARY_KEYS, CHECKPOINT_KEY)}}
        if result.error:
            row["error"] = exception_message(str(result.error))[:2000]
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    # finished trials first, by the metric: an interrupted trial's last epoch is not its result
    keys = ["unfinished", *([metric] if metric in table else [])]
    table = table.assign(unfinished=table["status"].ne("OK")).sort_values(
        keys, ascending=[True, mode == "min"][:len(keys)], na_position="last", kind="stable")
    table = table.drop(columns="unfinished")
    return table.dropna(axis=1, how="all").reset_index(drop=True)


def varied_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c.startswith("config/") and table[c].nunique(dropna=False) > 1]


def failed_trials(table: pd.DataFrame) -> list[str]:
    """The trial folders of the trials that ended in an error."""
    return [] if table.empty else list(table.loc[table["status"] == "ERROR", "trial"])


def resume_redo(table: pd.DataFrame) -> tuple[int, int] | None:
    """(epochs a resume trains again, trials) over the interrupted trials: each restarts from its newest
    checkpoint (before the first, from scratch)."""
    cut = table[table["status"].eq("INTERRUPTED")] if "status" in table else table.iloc[:0]
    if cut.empty or "epoch" not in cut:
        return None
    done = cut["epoch"].fillna(0)
    kept = cut[CHECKPOINT_KEY].fillna(0) if CHECKPOINT_KEY in cut else 0 * done
    redo = int((done - kept).clip(lower=0).sum())
    return (redo, len(cut)) if redo else None


def nested(flat: dict) -> dict:
    """{"optim/lr": np.float64(0.001)} -> {"optim": {"lr": 0.001}}: as the study's SPACE writes it."""
    out: dict = {}
    for key, value in flat.items():
        *path, last = key.split("/")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value.item() if hasattr(value, "item") else value
    return out


def print_summary(table: pd.DataFrame, name: str, study_dir: str, uri: str, metric: str, expected: int,
                  mlflow_lines: list[str], goals: list[tuple[str, str]] | None = None) -> None:
    extra = [m for m, _ in goals or [] if m != metric]
    shown = ["name" if "name" in table else "trial", "status", *[k for k in (metric, *extra, "epoch") if k in table.columns],
             *varied_columns(table)]
    unfinished = len(table[table["status"].isin(("INTERRUPTED", "NOT_STARTED"))]) + max(0, expected - len(table))
    state = f", INCOMPLETE: {unfinished} of {max(expected, len(table))} unfinished" if unfinished else ""
    print(f"\n=== {name}: {len(table)} trial(s){state}, sorted by {metric} ===")
    print(table[shown].rename(columns=lambda c: c.removeprefix("config/")).to_string(
        index=False, max_colwidth=40, float_format=lambda v: f"{v:.4g}"))
    for _, failed in table[table["status"] == "ERROR"].iterrows():
        print(f"ERROR {failed['trial']}: {failed.get('error', '')[:400]}")
    if expected > len(table):  # Tune creates a grid's trials as slots free up: the rest were never created
        print(f"({expected - len(table)} more trial(s) not created yet: the resume runs them)")
    redo = resume_redo(table)
    if redo:
        print(f"(a resume redoes {redo[0]} epoch(s) of {redo[1]} interrupted trial(s): their work since their last "
              "checkpoint; --checkpoint-every sets how much that can be)")
    if goals and len(goals) == 2:
        front = pareto_front(table, goals)
        print(f"Pareto front ({', '.join(f'{m} {d}' for m, d in goals)}): " + (", ".join(
            f"{row.get('name', row['trial'])} ({', '.join(f'{row[m]:.4g}' for m, _ in goals)})"
            for _, row in front.iterrows()) or "no finished trial"))
    print(f"\ntable: {study_dir}/trials.csv")
    best = table[table["status"] == "OK"]
    if not best.empty:
        varied = varied_columns(table) or [c for c in table.columns if c.startswith("config/")]
        print("best config" + (" among the finished trials so far" if state else "") + ":",
              nested({c.removeprefix("config/"): best.iloc[0][c] for c in varied}),
              "(every field: trials.csv, MLflow params)")
    for line in mlflow_lines:  # the UI command and the URL of the study's runs (model-training view)
        print(redact(line))
    if not uri.startswith("sqlite:"):
        print("           (the tracking server; see README, 'Run on a cluster', for port forwarding)")
    print(f"report:    python -m analysis {study_dir} --mlflow-uri {redact(uri)}")


def report_finding(finding: Finding, table: pd.DataFrame, study_dir: str, mixed: bool = False) -> None:
    """The report's claim judged on this study's trials: printed, and kept as finding.json for analysis. ``mixed``:
    PBT changed the trials' hyperparameters as they trained, so no trial stands for one variant."""
    verdict = judge(finding, table)
    if mixed:
        verdict = dataclasses.replace(verdict, verdict=UNTESTABLE, n=0, measured=(
            "no per-variant verdict under PBT: it copies the best trials' weights into the others and perturbs their "
            "hyperparameters as they train, so each trial's result mixes variants (its lineage: the trials' "
            "restored_from and config per epoch in result.json)"))
    write_file(f"{study_dir}/finding.json", json.dumps(verdict.to_dict(), indent=2, default=str))
    print(f"\n{verdict.text()}\nfinding: {study_dir}/finding.json")
