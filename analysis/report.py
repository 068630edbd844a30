"""Which table and figures a study gets, written into ``STUDY_DIR/report/`` with the data behind them.

Each figure is drawn from the best trial of each variant (``tables.best_per_variant``); trials that
failed are listed in the table only, and trials stopped early (ASHA) give what their last checkpoint holds.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from analysis import embed, figures, images, search_figures
from analysis.importance import NAMES, importance_caption, importance_html, importance_markdown, param_importance
from analysis.load import Artifacts, Study, read_lineage
from analysis.naming import NOT_A_VARIANT
from analysis.tables import (METRICS, best_per_variant, pareto_front, ranked, results_table, short_id, to_markdown,
                             varied_params)
from analysis.variants import (finding_html, finding_markdown, letters_of, study_verdict, variant_html,
                               variant_markdown, variant_table)
from trainables.data import dataset_info

log = logging.getLogger(__name__)
MAX_VARIANTS = 8  # figures compare at most this many variants (the best ones of a long search)
SWEPT = ("latent_dim", "optim/lr", "beta")  # section III: final loss against latent size / learning rate
STALE = ("tsne_*.png", "pca_*.png", "final_vs_*.png", "data/confusion_*.npy")
# files a build writes only sometimes: removed after a build that did not write them (not before, so that a page
# rewritten every few seconds by --watch never points at a figure that is momentarily gone)
OPTIONAL = ("learning_curves_trials.png", "parallel_coordinates.png", "importance.png", "importance.md", "pareto.png",
            "data/pareto.csv", "lineage.png", "data/lineage.csv",
            "data/importance.csv")


@dataclass
class Entry:
    """One item of the report: a figure or table file (relative to the report folder) and its caption."""

    section: str
    title: str
    path: str
    caption: str
    html: str = ""  # the entry's own HTML, for a text entry (.md) other than the results table


@dataclass
class Report:
    study: Study
    out: Path
    table: pd.DataFrame
    entries: list[Entry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was skipped, and why
    timings: dict[str, float] = field(default_factory=dict)


def who(row: pd.Series, artifacts: Artifacts | None = None) -> str:
    """'C (trial fd294_00002: optim/name=adam, ...; checkpoint after epoch 2)' for captions."""
    text = f"{row['label']} (trial {short_id(row['trial'])}: {row['setting']}"
    if not pd.isna(row.get("config/seed")):  # a variant's figures show one of its seeds: name it
        text += f", seed {int(row['config/seed'])}"
    if artifacts is not None and artifacts.checkpoint is not None:
        text += f"; checkpoint after epoch {artifacts.checkpoint + 1}"
    return text + ")"


def class_names(study: Study, artifacts: Artifacts, trial: str) -> list[str]:
    """From meta.json, or from the data set when the trial stopped before writing it."""
    if artifacts.meta.get("class_names"):
        return list(artifacts.meta["class_names"])
    return list(dataset_info(study.config(trial).get("dataset", study.base.get("dataset"))).class_names)


class Builder:
    """Writes the report's files one section at a time; ``progress`` gets one line per slow step."""

    def __init__(self, study: Study, out: Path, perplexity: float | None = None,
                 progress: Callable[[str], None] = log.info, evaluator: str = "fanova",
                 projections: dict | None = None) -> None:
        self.study, self.out, self.perplexity, self.progress = study, out, perplexity, progress
        self.evaluator = evaluator
        self.report = Report(study, out, results_table(study))
        self.trials = ranked(study)
        self.best = best_per_variant(study, MAX_VARIANTS)
        variants = self.trials.loc[self.trials["rank"].notna(), "variant"].nunique()
        if variants > MAX_VARIANTS:
            self.report.notes.append(f"figures compare the {MAX_VARIANTS} best of {variants} variants "
                                     f"({', '.join(self.best['variant'])}); the table lists every trial")
        # t-SNE and PCA by input: shared across the rebuilds of --watch, which redraw unchanged checkpoints
        self._projections: dict[tuple, tuple[np.ndarray, str]] = {} if projections is None else projections
        self.written: set[str] = set()

    def add(self, section: str, title: str, path: Path, caption: str, html: str = "") -> None:
        self.written.add(str(path.relative_to(self.out)))
        self.report.entries.append(Entry(section, title, str(path.relative_to(self.out)), caption, html))

    def picks(self, need: str) -> list[tuple[pd.Series, Artifacts]]:
        """Per variant, its best trial whose last checkpoint holds ``need`` (else the variant is skipped)."""
        ok = self.trials[self.trials["rank"].notna()].sort_values("rank", kind="stable")
        chosen = []
        for variant in self.best["variant"]:
            for _, row in ok[ok["variant"] == variant].iterrows():
                artifacts = self.study.artifacts(row["trial"])
                if (artifacts.confusion is not None) if need == "confusion" else bool(artifacts.get(need)):
                    chosen.append((row, artifacts))
                    break
            else:
                self.report.notes.append(f"variant {variant}: no trial saved {need} (stopped early?)")
        return chosen

    def table(self) -> None:
        table = self.report.table
        table.to_csv(self.out / "table.csv", index=False)
        (self.out / "table.md").write_text(to_markdown(table))
        self.add("Results", "Table", self.out / "table.md",
                 f"Final metrics of every trial of study {self.study.name} (a row per trial; letters = variants "
                 f"in grid order; ★ = best by {self.study.metric}, {self.study.mode}).")

    def finding(self) -> None:
        verdict = study_verdict(self.study)
        if verdict is None:
            self.report.notes.append("the study states no finding of the report (no FINDING in its script)")
            return
        (self.out / "finding.json").write_text(json.dumps(verdict.to_dict(), indent=2, default=str))
        letters = letters_of(self.study, verdict)
        (self.out / "finding.md").write_text(finding_markdown(verdict, letters))
        self.add("Finding", "Finding", self.out / "finding.md",
                 "The report's claim judged on this study's OK trials. Data: finding.json.",
                 finding_html(verdict, letters))

    def variants(self) -> None:
        table = variant_table(self.study)
        if table.empty:
            return
        table.to_csv(self.out / "variants.csv", index=False)
        (self.out / "variants.md").write_text(variant_markdown(table, self.study))
        self.add("Variants over seeds", "Variants", self.out / "variants.md",
                 f"Per variant, the mean ± std over its seeds of every final metric; ★ = best by mean "
                 f"{self.study.metric}; every other variant's difference to it with a 95% interval. "
                 "Data: variants.csv.", variant_html(table, self.study))

    def curves(self) -> None:
        shown = self.trials[self.trials["status"].eq("OK")].sort_values("label")
        legend = {row["trial"]: f"{row['label']}: {row['setting']}" for _, row in shown.iterrows()}
        curves = self.study.curves[self.study.curves["trial"].isin(legend)]
        if curves.empty:
            self.report.notes.append("no per-epoch results to plot")
            return
        curves.to_csv(self.out / "curves.csv", index=False)
        groups = None
        if shown["variant"].duplicated().any():  # several seeds per variant: one colour and a band per variant
            groups = {f"{variant}: {rows['setting'].iloc[0]} (n={len(rows)})": list(rows["trial"])
                      for variant, rows in shown.groupby("variant", sort=False)}
        figure = figures.learning_curves(curves, legend, self.study.task, f"{self.study.name}: learning curves",
                                         groups)
        path = figures.save(figure, self.out / "learning_curves.png")
        panels = figures.CURVES.get(self.study.task, figures.CURVES["classification"])
        measures = ", ".join(name for name in panels if name != "loss")
        spread = ("; a line per variant = the mean over its seeds, band = their min to max" if groups else
                  "; legend = variant and its hyperparameters")
        self.add("Learning curves", "Learning curves", path,
                 f"Per-epoch loss (train solid, val dashed) and val {measures} of every OK trial of study "
                 f"{self.study.name}{spread}. Data: curves.csv.")

    def hyperparams(self) -> list[str]:
        """The trials' varied hyperparameters (``config/...``), seeds and data folders aside."""
        return [c for c in varied_params(self.study.trials) if c.removeprefix("config/") not in NOT_A_VARIANT]

    def trial_curves(self) -> None:
        trials = self.trials[self.trials["trial"].isin(set(self.study.curves["trial"]))]
        if trials.empty or (not trials["variant"].duplicated().any() and trials["status"].eq("OK").all()):
            return  # one OK trial per variant: the learning curves above already draw each of them
        trials = trials.sort_values("label", key=lambda s: s.map(lambda v: (len(v.split(".")[0]), v)))
        legend = {variant: f"{variant}: {rows['setting'].iloc[0]} (n={len(rows)})"
                  for variant, rows in trials.groupby("variant", sort=False)}
        failed = set(trials.loc[trials["status"].eq("ERROR"), "trial"])
        curves = self.study.curves[self.study.curves["trial"].isin(set(trials["trial"]))]
        figure = figures.trial_curves(curves, dict(zip(trials["trial"], trials["variant"])), legend, failed,
                                      self.study.task, f"{self.study.name}: every trial's learning curves")
        path = figures.save(figure, self.out / "learning_curves_trials.png")
        statuses = ", ".join(f"{n} {s}" for s, n in trials["status"].value_counts().items())
        self.add("Learning curves", "Every trial", path,
                 f"The per-epoch curves of all {len(trials)} trials that reported ({statuses}), a line per trial "
                 "and a colour per variant (train solid, val dashed; x = a failed trial's last report): the spread "
                 "over seeds and the trials stopped early that the means above leave out. Data: curves.csv.")

    def parallel(self) -> None:
        params = self.hyperparams()
        if not params:
            self.report.notes.append("no hyperparameter varies between the trials: no parallel coordinates")
            return
        if self.study.metric not in self.trials or self.trials[self.study.metric].isna().all():
            self.report.notes.append(f"no trial reported {self.study.metric}: no parallel coordinates")
            return
        figure = search_figures.parallel_coordinates(self.trials, params, self.study.metric, self.study.mode,
                                                     f"{self.study.name}: hyperparameters to {self.study.metric}")
        path = figures.save(figure, self.out / "parallel_coordinates.png")
        self.add("Hyperparameters", "Parallel coordinates", path,
                 f"Every trial of study {self.study.name} as a line through its value of each varied hyperparameter "
                 f"to its last {self.study.metric} (colour: the metric, bright = better; dashed: not finished OK; "
                 "'-': no value). Categorical axes space their values evenly; numeric axes spanning 8x or more are "
                 "log. Data: table.csv.")

    def lineage(self) -> None:
        """PBT: which trial copied which, at which epoch, with what configuration, from the trials' reports."""
        try:
            scheduler = json.loads((self.study.path / "study.json").read_text()).get("scheduler")
        except (OSError, ValueError):
            return
        if scheduler != "pbt":
            return
        rows = read_lineage(self.study.path, list(self.trials["trial"]))
        moved = [c for c in rows.columns if c.startswith("config/") and rows[c].nunique() > 1
                 and pd.api.types.is_numeric_dtype(rows[c])] if not rows.empty else []
        if not moved:
            self.report.notes.append("PBT study: no trial's configuration changed, no lineage to draw")
            return
        rows.to_csv(self.out / "data" / "lineage.csv", index=False)
        self.written.add("data/lineage.csv")
        copies = int(((rows["restored_from"] != "") & (rows["restored_from"] != rows["trial"])).sum())
        figure = search_figures.lineage(rows, moved[0], f"{self.study.name}: PBT lineage")
        self.add("Hyperparameters", "PBT lineage", figures.save(figure, self.out / "lineage.png"),
                 f"Each trial's epochs, coloured by {moved[0].removeprefix('config/')} as PBT perturbed it; an arrow "
                 f"for each of the {copies} copies of another trial's checkpoint (from its epoch to where the copy "
                 "continued), read from the trials' own reports. Data: data/lineage.csv.")

    def pareto(self) -> None:
        """Two objectives (``--metric`` twice): every finished trial on both, the front drawn and listed."""
        try:
            goals = [tuple(goal) for goal in json.loads((self.study.path / "study.json").read_text()).get("objectives")
                     or []]
        except (OSError, ValueError):
            return
        if len(goals) != 2:
            return
        front = pareto_front(self.trials, goals)
        figure = search_figures.pareto(self.trials, front, goals, f"{self.study.name}: Pareto front")
        columns = [c for c in ("name", "trial", *(m for m, _ in goals)) if c in front]
        front[columns].to_csv(self.out / "data" / "pareto.csv", index=False)
        self.written.add("data/pareto.csv")
        self.add("Objectives", "Pareto front", figures.save(figure, self.out / "pareto.png"),
                 f"The {len(front)} finished trial(s) no other beats on both {goals[0][0]} ({goals[0][1]}) and "
                 f"{goals[1][0]} ({goals[1][1]}), joined in red, among every finished trial (grey): "
                 + ", ".join(str(row.get("name", row["trial"])) for _, row in front.iterrows()) + ". Data: data/pareto.csv.")

    def importance(self) -> None:
        result = param_importance(self.trials, self.hyperparams(), self.study.metric, self.study.mode,
                                  self.evaluator)
        (self.out / "importance.md").write_text(importance_markdown(result))
        if result.reason:
            self.add("Hyperparameters", "Importance", self.out / "importance.md",
                     f"Importance by Optuna's {NAMES[self.evaluator]} (--importance {self.evaluator}).",
                     importance_html(result))
            return
        result.table.to_csv(self.out / "data" / "importance.csv", index=False)
        self.written.add("data/importance.csv")
        self.add("Hyperparameters", "Importance", self.out / "importance.md",
                 importance_caption(result, self.study.metric) + " Data: data/importance.csv.", importance_html(result))
        figure = search_figures.importance_bars(result.table, NAMES[self.evaluator], self.study.metric,
                                                f"{self.study.name}: hyperparameter importance")
        self.add("Hyperparameters", "Importance (figure)", figures.save(figure, self.out / "importance.png"),
                 f"The {NAMES[self.evaluator]} shares above as bars.")

    def confusion(self) -> None:
        picks = self.picks("confusion")
        if not picks:
            return
        panels = []
        for row, artifacts in picks:
            np.save(self.out / "data" / f"confusion_{row['label']}.npy", artifacts.confusion)
            panels.append((f"{row['label']}: {row['setting']}", artifacts.confusion))
        names = class_names(self.study, picks[0][1], picks[0][0]["trial"])
        figure = figures.confusion_matrices(panels, names, f"{self.study.name}: confusion matrices (val)")
        path = figures.save(figure, self.out / "confusion_matrices.png")
        self.add("Confusion matrices", "Confusion matrices", path,
                 f"Val confusion matrices of study {self.study.name}, best trial of each variant: "
                 + "; ".join(who(r, a) for r, a in picks) + ". Rows = expected class, columns = predicted; colour = "
                 "count + 1 on a log scale. Matrices: data/confusion_<variant>.npy.")

    def samples(self) -> None:
        picks = self.picks("samples")
        if not picks:
            return
        first = picks[0][1].get("samples")
        same = []
        for row, artifacts in picks:
            if _same_images(artifacts.get("samples"), first):
                same.append((row, artifacts))
            else:
                self.report.notes.append(f"variant {row['label']}: its samples are other val images, left out")
        # row labels have room for the setting; segmentation's column titles get the letter only
        short = self.study.task == "segmentation"
        variants = [(row["label"] if short else f"{row['label']}: {row['setting']}", artifacts.get("samples"))
                    for row, artifacts in same]
        source = "; ".join(who(r, a) for r, a in same)
        names = class_names(self.study, same[0][1], same[0][0]["trial"])
        title = f"{self.study.name}: the same val images"
        if self.study.task == "segmentation":
            figure = images.segmentation_samples(variants, names, title=title)
            self.add("Sample predictions", "Sample predictions", figures.save(figure, self.out / "predictions.png"),
                     f"Val image, ground truth and each variant's predicted mask (VOC colours) — {source}.")
        elif self.study.task == "classification":
            figure = images.classification_samples(variants, names, title=title)
            self.add("Sample predictions", "Sample predictions", figures.save(figure, self.out / "predictions.png"),
                     f"Val images as 'expected→predicted' per variant (red = wrong) — {source}.")
        else:
            figure = images.reconstructions(variants, title=f"{self.study.name}: reconstructions")
            self.add("VAE samples", "Reconstructions", figures.save(figure, self.out / "reconstructions.png"),
                     f"Val inputs (top row) and each variant's reconstruction — {source}.")
            figure = images.prior_samples(variants, title=f"{self.study.name}: decoded prior samples z ~ N(0, I)")
            self.add("VAE samples", "Prior samples", figures.save(figure, self.out / "prior_samples.png"),
                     f"Images decoded from latent vectors drawn from the prior — {source}.")

    def embeddings(self) -> None:
        rows = []
        for row, artifacts in self.picks("features"):
            features = artifacts.get("features")
            taps = embed.ordered_taps(features)
            for method in embed.METHODS:
                panels = []
                for tap in taps:
                    problem = embed.can_embed(features[tap])
                    if problem:
                        self.report.notes.append(f"{row['label']} {tap}: no {method} ({problem})")
                        continue
                    points, name = self.project(method, row["label"], tap, features[tap])
                    panels.append((name, points))
                    rows.append(pd.DataFrame({"label": row["label"], "trial": row["trial"], "tap": tap,
                                              "method": method, "index": features["indices"],
                                              "class": features["labels"], "x": points[:, 0], "y": points[:, 1]}))
                if panels:
                    self.embedding_figure(row, artifacts, method, panels, taps)
        if rows:
            pd.concat(rows, ignore_index=True).to_csv(self.out / "data" / "embeddings.csv", index=False)

    def embedding_figure(self, row: pd.Series, artifacts: Artifacts, method: str, panels: list, taps: list) -> None:
        labels = artifacts.get("features")["labels"].astype(np.int64)
        names = class_names(self.study, artifacts, row["trial"])
        segmentation = self.study.task == "segmentation"
        method_name = "t-SNE" if method == "tsne" else "PCA"
        figure = figures.embeddings(panels, labels, names, segmentation,
                                    f"{self.study.name} {row['label']}: {method_name} of saved features")
        path = figures.save(figure, self.out / f"{method}_{row['label']}.png")
        by = "class (the dominant non-background class of the mask)" if segmentation else "class"
        self.add("Feature embeddings", f"{method_name} {row['label']}", path,
                 f"{method_name} of the features of {len(labels)} val samples at {', '.join(taps)}, coloured by "
                 f"{by} — {who(row, artifacts)}. Points: data/embeddings.csv.")

    def project(self, method: str, label: str, tap: str, features: np.ndarray) -> tuple[np.ndarray, str]:
        """2-D points and a panel title; identical inputs (every VAE's 'input' tap) are embedded once."""
        key = (method, features.shape, hashlib.sha1(np.ascontiguousarray(features).tobytes()).hexdigest())
        if key not in self._projections:
            start = time.perf_counter()
            if method == "tsne":
                points = embed.tsne(features, self.perplexity)
                self._projections[key] = points, f"t-SNE of {tap} ({features.shape[1]}-d)"
            else:
                points, ratio = embed.pca(features)
                self._projections[key] = points, (f"PCA of {tap} ({features.shape[1]}-d, "
                                                  f"{100 * ratio.sum():.0f}% of variance)")
            seconds = time.perf_counter() - start
            self.report.timings[f"{method} {label} {tap}"] = seconds
            if method == "tsne":
                self.progress(f"  t-SNE {label} {tap:<15} {features.shape[0]}x{features.shape[1]}  {seconds:.1f}s")
        return self._projections[key]

    def feature_maps(self) -> None:
        picks = self.picks("feature_maps")
        if not picks:
            return
        row, artifacts = min(picks, key=lambda pick: pick[0]["rank"])  # the best trial that saved them
        maps = artifacts.get("feature_maps")
        taps = [t for t in maps if t.startswith("decoder_block")] or embed.ordered_taps(maps)
        samples = artifacts.get("samples")  # the maps are of the first sample image
        image = samples["images"][0] if "images" in samples else None
        figure = images.feature_maps(maps, sorted(taps, key=embed.ordered_taps(maps).index), image,
                                     title=f"{self.study.name} {row['label']}: feature maps of one val image")
        path = figures.save(figure, self.out / "feature_maps.png")
        where = "decoder block" if taps[0].startswith("decoder_block") else "tap"
        self.add("Feature maps", "Feature maps", path,
                 f"The first channels at the end of each {where} for the first sample image — {who(row, artifacts)}.")

    def swept(self) -> None:
        table = self.report.table
        varied = {c.removeprefix("config/") for c in varied_params(self.study.trials)}
        metrics = [m for m in METRICS[self.study.task] if m.startswith("val/")]
        for param in [p for p in SWEPT if p in varied]:
            figure = figures.final_vs_param(table, param, metrics, f"{self.study.name}: final metrics vs {param}")
            path = figures.save(figure, self.out / f"final_vs_{param.replace('/', '_')}.png")
            self.add("Final loss vs hyperparameter", f"vs {param}", path,
                     f"Final val metrics of every OK trial of study {self.study.name} against {param} (dots = trials, "
                     f"line = mean per value of the trials that ran every epoch; hollow = stopped early).")

    def build(self) -> Report:
        (self.out / "data").mkdir(parents=True, exist_ok=True)
        for stale in STALE:  # per-variant files of an earlier build whose variants may be gone
            for path in self.out.glob(stale):
                path.unlink()
        curves = [self.curves, self.trial_curves, self.parallel, self.importance, self.pareto, self.lineage]
        steps = {"classification": [self.table, *curves, self.confusion, self.samples, self.embeddings],
                 "segmentation": [self.table, *curves, self.confusion, self.samples, self.embeddings,
                                  self.feature_maps],
                 "generation": [self.table, *curves, self.samples, self.embeddings, self.swept]}
        steps = steps.get(self.study.task, [self.table, *curves])
        # the page opens with the report's claim and its verdict; the per-variant table follows Table I
        for step in [self.finding, steps[0], self.variants, *steps[1:]]:
            start = time.perf_counter()
            step()
            self.report.timings[step.__name__] = time.perf_counter() - start
            self.progress(f"{step.__name__:<13} {self.report.timings[step.__name__]:5.1f}s")
        for name in OPTIONAL:
            if name not in self.written:
                (self.out / name).unlink(missing_ok=True)
        return self.report


def _same_images(samples: dict, reference: dict) -> bool:
    if "indices" in samples and "indices" in reference:
        return np.array_equal(samples["indices"], reference["indices"])
    return samples["images"].shape == reference["images"].shape and np.allclose(samples["images"], reference["images"])


def report_folder(study: Study, out: str | Path | None = None) -> Path:
    """Where a study's page goes: ``out``, else STUDY_DIR/report, or ./report/<name> for a study read from a URI."""
    if out:
        return Path(out).resolve()
    return Path("report", study.name).resolve() if study.source else study.path / "report"


def build_report(study: Study, out: Path | None = None, perplexity: float | None = None,
                 progress: Callable[[str], None] = log.info, evaluator: str = "fanova",
                 projections: dict | None = None) -> Report:
    """Write the table, figures and their data for a loaded study into ``out`` (default STUDY_DIR/report);
    ``evaluator``: the importance evaluator (fanova, ped-anova); ``projections``: a cache kept across rebuilds."""
    return Builder(study, Path(out) if out else study.path / "report", perplexity, progress, evaluator,
                   projections).build()
