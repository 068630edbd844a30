"""A study folder (``<storage>/<name>/``) as DataFrames and arrays: trials, per-epoch curves, artifacts.

Reads only files (study.json, trials.csv, Ray Tune's trial folders), so it works on a copied results
folder and in a notebook: ``study = load_study("results/seg_optimizers"); study.trials; study.curves``.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.progress import FINISHED, UNFINISHED, snapshot_statuses, study_state
from trainables.config import CONFIGS
from analysis.naming import flatten
from analysis.tune_state import outcome

ARTIFACT_ARRAYS = ("features", "samples", "feature_maps")
_CHECKPOINT = re.compile(r"checkpoint_(\d+)$")


@dataclass(frozen=True)
class Artifacts:
    """What one trial's last checkpoint holds; a trial stopped early (ASHA) has only its confusion matrix."""

    trial: str
    folder: Path | None  # the checkpoint's artifacts/ folder
    checkpoint: int | None  # Tune's checkpoint index (0 = after the first epoch)
    meta: dict = field(default_factory=dict)
    confusion: np.ndarray | None = None  # (K,K) rows = target, cols = prediction
    arrays: dict = field(default_factory=dict)  # {"features": {...}, "samples": {...}, "feature_maps": {...}}

    def get(self, name: str) -> dict:
        """One saved npz as a dict of arrays ({} when the trial did not write it)."""
        return self.arrays.get(name, {})

    def image(self, name: str) -> Path | None:
        """A ready-made PNG of the trial (predictions.png, reconstructions.png, prior_samples.png)."""
        path = self.folder / name if self.folder else None
        return path if path and path.is_file() else None


@dataclass
class Study:
    """One study: its description (study.json), trials table and per-epoch curves."""

    path: Path
    name: str
    task: str
    metric: str
    mode: str
    mlflow_uri: str | None
    base: dict
    trials: pd.DataFrame
    curves: pd.DataFrame
    finding: dict | None = None  # the report's claim the study tests (study.json), see analysis/finding.py
    _cache: dict = field(default_factory=dict, repr=False)
    state: str = FINISHED  # or running, interrupted, failed, killed (analysis/progress.py)
    rankable: tuple = ("OK",)  # statuses ranked for "best"; --include-unfinished adds the unfinished ones
    source: str | None = None  # the URI (s3://...) of a study read through a local copy at ``path``

    @property
    def location(self) -> str:
        """Where the study lives: its URI, or its folder."""
        return self.source or str(self.path)

    @property
    def complete(self) -> bool:
        return self.state == FINISHED and not self.trials["status"].isin(UNFINISHED).any()

    def trial_dir(self, trial: str) -> Path:
        return self.path / trial

    def artifacts(self, trial: str) -> Artifacts:
        """The trial's last-checkpoint artifacts (read once, then cached)."""
        if trial not in self._cache:
            self._cache[trial] = load_artifacts(self.trial_dir(trial))
        return self._cache[trial]

    def config(self, trial: str) -> dict:
        """The trial's config as Tune passed it (params.json)."""
        path = self.trial_dir(trial) / "params.json"
        return json.loads(path.read_text()) if path.is_file() else {}


def config_defaults(task: str) -> dict:
    """Flat defaults of the task's config: what a trial used for a field its config dict left out.

    A nested dict from the search space replaces the base's whole sub-config (``{"name": "adam", "lr": 1e-3}``),
    so its missing keys take the sub-config class's own defaults (Adam's momentum: OptimConfig's 0.0).
    """
    if task not in CONFIGS:
        return {}
    flat = {}
    for spec in dataclasses.fields(CONFIGS[task]):
        default = spec.default if spec.default is not dataclasses.MISSING else (
            spec.default_factory() if spec.default_factory is not dataclasses.MISSING else None)
        if dataclasses.is_dataclass(default):
            flat.update(flatten(dataclasses.asdict(type(default)()), f"{spec.name}/"))
        else:
            flat[spec.name] = default
    return flat


def fill_defaults(trials: pd.DataFrame, task: str) -> pd.DataFrame:
    """Missing config values (NaN in trials.csv) replaced by the value the trial really trained with (none for a
    trial that never started: it trained with nothing)."""
    trials = trials.copy()
    started = ~trials["status"].isin(("NOT_STARTED", "PENDING")) if "status" in trials else pd.Series(True, trials.index)
    for name, default in config_defaults(task).items():
        column = f"config/{name}"
        if column in trials and default is not None and trials[column].isna().any():
            filled = trials[column].astype(object).where(trials[column].notna() | ~started, default)
            trials[column] = pd.to_numeric(filled) if isinstance(default, (int, float)) else filled
    return trials


def read_results(trial_dir: Path) -> pd.DataFrame:
    """result.json (one JSON line per report) as a frame of numeric columns, one row per epoch."""
    path = trial_dir / "result.json"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a crash mid-write
                    continue
    frame = pd.DataFrame([{k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                          for row in rows])
    if frame.empty:
        return frame
    if "epoch" not in frame:
        frame["epoch"] = frame.get("training_iteration", pd.Series(range(1, len(frame) + 1)))
    # a retried or resumed trial reports some epochs twice: the later report wins
    return frame.drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)


def _trial_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and (p / "params.json").is_file())


def trials_from_folders(path: Path, metric: str, mode: str, running: bool = False) -> pd.DataFrame:
    """The trials table rebuilt from trial folders and Tune's snapshot, for a study that is running or was
    stopped before it wrote trials.csv: only trials the snapshot records as finished are OK."""
    rows, statuses = [], snapshot_statuses(path)
    for trial_dir in _trial_dirs(path):
        results = read_results(trial_dir)
        last = results.iloc[-1].to_dict() if not results.empty else {}
        try:
            config = json.loads((trial_dir / "params.json").read_text())
        except ValueError:  # a running study: Tune is writing the file of a trial that just started
            config = {}
        error = (trial_dir / "error.txt").is_file()
        tune_status = statuses.get(trial_dir.name, "") if statuses is not None else ("" if results.empty else None)
        status = outcome(tune_status, error, len(results))
        rows.append({"trial": trial_dir.name, "status": status,
                     **{f"config/{k}": v for k, v in flatten(config).items()},
                     **{k: v for k, v in last.items() if "/" in k or k == "epoch"}})
    folders = {row["trial"] for row in rows}
    # trials Tune holds that have no folder yet: listed, with no config rather than an invented one
    rows += [{"trial": name, "status": outcome(status, False, 0)} for name, status in (statuses or {}).items()
             if name not in folders]
    if running:  # not cut short: still going, or waiting for a slot
        for row in rows:
            row["status"] = {"INTERRUPTED": "RUNNING", "NOT_STARTED": "PENDING"}.get(row["status"], row["status"])
    table = pd.DataFrame(rows)
    if table.empty or metric not in table:
        return table
    return table.sort_values(metric, ascending=mode == "min", na_position="last", kind="stable").reset_index(drop=True)


def read_lineage(path: Path, trials: list[str]) -> pd.DataFrame:
    """PBT's lineage from the trials' own reports: per trial and epoch, the config it trained with (flat, varied or
    not) and, after a restore, the trial whose checkpoint it continued (``restored_from``) and that epoch."""
    from analysis.naming import flatten

    rows = []
    for trial in trials:
        result = path / trial / "result.json"
        for line in (result.read_text().splitlines() if result.is_file() else []):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows.append({"trial": trial, "epoch": row.get("epoch"), "restored_from": row.get("restored_from") or "",
                         "restored_epoch": row.get("restored_epoch"),
                         **{f"config/{k}": v for k, v in flatten(row.get("config") or {}).items()}})
    return pd.DataFrame(rows)


def load_curves(path: Path, trials: list[str]) -> pd.DataFrame:
    """Every trial's per-epoch metrics in one long-by-trial frame: columns trial, epoch, train/loss, val/..."""
    frames = []
    for trial in trials:
        results = read_results(path / trial)
        if not results.empty:
            keep = ["epoch", *[c for c in results.columns if "/" in c]]
            frames.append(results[keep].assign(trial=trial))
    if not frames:
        return pd.DataFrame(columns=["trial", "epoch"])
    curves = pd.concat(frames, ignore_index=True)
    return curves[["trial", *[c for c in curves.columns if c != "trial"]]]


def last_checkpoint(trial_dir: Path) -> tuple[Path | None, int | None]:
    """The trial's newest checkpoint folder and its index (Tune keeps the last two)."""
    found = [(int(m.group(1)), p) for p in trial_dir.glob("checkpoint_*") if (m := _CHECKPOINT.search(p.name))]
    if not found:
        return None, None
    index, folder = max(found)
    return folder, index


def load_artifacts(trial_dir: Path) -> Artifacts:
    """The last checkpoint's artifacts/ folder: meta, confusion matrix and the npz arrays that exist."""
    checkpoint, index = last_checkpoint(trial_dir)
    folder = checkpoint / "artifacts" if checkpoint else None
    if folder is None or not folder.is_dir():
        return Artifacts(trial_dir.name, None, index)
    meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
    confusion = np.load(folder / "confusion_matrix.npy") if (folder / "confusion_matrix.npy").is_file() else None
    arrays = {}
    for name in ARTIFACT_ARRAYS:
        if (folder / f"{name}.npz").is_file():
            with np.load(folder / f"{name}.npz") as npz:
                arrays[name] = {key: npz[key] for key in npz.files}
    return Artifacts(trial_dir.name, folder, index, meta, confusion, arrays)


def load_study(path: str | Path) -> Study:
    """Read a study folder written by the runner (``studies/runner/``); fails with a message naming what is missing."""
    path = Path(path).expanduser().resolve()
    described = path / "study.json"
    if not described.is_file():
        raise FileNotFoundError(f"{path} is not a study folder: {described.name} is missing (expected "
                                "<storage>/<study name>/ as written by 'python studies/NAME.py --storage <storage>')")
    info = json.loads(described.read_text())
    metric, mode = info.get("metric", "val/loss"), info.get("mode", "min")
    state = study_state(info)
    # trials.csv is the runner's final word when it ended (finished or interrupted); a running or killed
    # study's is missing or stale, so the folders and Tune's snapshot tell
    if (path / "trials.csv").is_file() and state in (FINISHED, "interrupted"):
        trials = pd.read_csv(path / "trials.csv")
    else:
        trials = trials_from_folders(path, metric, mode, running=state == "running")
    if trials.empty:
        raise ValueError(f"{path} holds no trials yet (no trials.csv and no trial folders with params.json)")
    trials = fill_defaults(trials, info.get("task", "")).reset_index(drop=True)
    curves = load_curves(path, list(trials["trial"]))
    return Study(path, info.get("name", path.name), info.get("task", ""), metric, mode, info.get("mlflow_uri"),
                 info.get("base", {}), trials, curves, info.get("finding"), state=state)
