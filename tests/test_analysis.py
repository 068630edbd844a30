"""analysis/: a study folder -> table, figures, index.html, report.md and an MLflow "report" run.

Fast tests build a study folder by hand in Ray Tune's on-disk layout (a finished trial, one stopped early
by ASHA, one that failed); the slow one trains a real --quick study and runs ``python -m analysis`` on it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis import embed, figures
from analysis.html import write_html, write_markdown
from analysis.load import load_artifacts, load_study, read_results
from analysis.report import build_report
from analysis.tables import label_trials, letters, results_table
from conftest import run_in_process

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
K = 21  # VOC classes (the shapes data set uses VOC's)


def assert_png(path: Path, min_side: int = 100) -> None:
    """A real, decodable, non-trivial PNG (signature, then a full decode by PIL)."""
    assert path.is_file(), f"{path.name} missing"
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    with Image.open(path) as image:
        image.load()
        assert min(image.size) >= min_side, f"{path.name} is only {image.size}"
        assert len(np.unique(np.asarray(image.convert("L")))) > 2, f"{path.name} is blank"


# ----------------------------------------------------------------------------- a study built by hand
def _trial(study: Path, index: int, optim: dict, metrics: list[dict], checkpoints: dict[int, dict]) -> str:
    name = f"train_segmenter_abcde_{index:05d}_{index}_optim=x_2026-01-01_00-00-00"
    folder = study / name
    folder.mkdir(parents=True)
    config = {"model": "unet_resnet50", "dataset": "shapes", "data_root": "/data", "image_size": 16, "epochs": 3,
              "optim": optim, "seed": 0, "class_weights": 0.1}
    (folder / "params.json").write_text(json.dumps(config))
    (folder / "result.json").write_text("".join(json.dumps({**m, "config": config}) + "\n" for m in metrics))
    for number, files in checkpoints.items():
        artifacts = folder / f"checkpoint_{number:06d}" / "artifacts"
        artifacts.mkdir(parents=True)
        for file_name, value in files.items():
            if file_name.endswith(".json"):
                (artifacts / file_name).write_text(json.dumps(value))
            elif file_name.endswith(".npz"):
                np.savez(artifacts / file_name, **value)
            else:
                np.save(artifacts / file_name, value)
    return name


def _epoch(epoch: int, precision: float) -> dict:
    return {"epoch": epoch, "train/loss": 3.0 - epoch / 10, "val/loss": 3.1 - epoch / 10, "val/accuracy": 0.2 * epoch,
            "val/precision": precision, "val/recall": 0.1, "val/miou": 0.05, "training_iteration": epoch}


@pytest.fixture
def hand_study(tmp_path) -> dict:
    """A: finished (full artifacts); B: stopped by ASHA after epoch 1 (a confusion matrix only); C: failed."""
    rng = np.random.default_rng(0)
    study = tmp_path / "seg_hand"
    n, side = 24, 16
    masks = rng.integers(0, K, (6, side, side))
    masks[:, 0, :] = 255  # VOC's void border
    final = {"confusion_matrix.npy": rng.integers(0, 50, (K, K)),
             "meta.json": {"task": "segmentation", "model": "unet_resnet50", "dataset": "shapes",
                           "class_names": [f"class{k}" for k in range(K)], "taps": ["encoder_out", "decoder_mid"]},
             "features.npz": {"encoder_out": rng.normal(size=(n, 32)), "decoder_mid": rng.normal(size=(n, 8)),
                              "labels": rng.integers(0, K, n), "indices": np.arange(n) * 3},
             "samples.npz": {"images": rng.random((6, 3, side, side)), "targets": masks,
                             "preds": rng.integers(0, K, (6, side, side)), "indices": np.arange(6) * 3},
             "feature_maps.npz": {"encoder_out": rng.random((16, 2, 2)), "decoder_mid": rng.random((16, 8, 8))}}
    # epoch 2 is reported twice, as after a retry: the later report must win
    a = _trial(study, 0, {"name": "sgd", "lr": 1e-4, "momentum": 0.9},
               [_epoch(1, 0.3), _epoch(2, 0.1), _epoch(2, 0.4), _epoch(3, 0.5)],
               {1: {"confusion_matrix.npy": rng.integers(0, 50, (K, K))}, 2: final})
    b_matrix = rng.integers(0, 50, (K, K))
    b = _trial(study, 1, {"name": "adam", "lr": 1e-3}, [_epoch(1, 0.2)], {0: {"confusion_matrix.npy": b_matrix}})
    c = _trial(study, 2, {"name": "sgd", "lr": 1e-2, "momentum": 0.9}, [], {})
    (study / c / "error.txt").write_text("RuntimeError: boom")
    (study / "study.json").write_text(json.dumps({"name": "seg_hand", "task": "segmentation", "metric": "val/precision",
                                                  "mode": "max", "mlflow_uri": None, "base": {}, "argv": []}))
    rows = [{"trial": a, "status": "OK", "config/optim/name": "sgd", "config/optim/lr": 1e-4,
             "config/optim/momentum": 0.9, **_epoch(3, 0.5)},
            {"trial": b, "status": "OK", "config/optim/name": "adam", "config/optim/lr": 1e-3,
             "config/optim/momentum": None, **_epoch(1, 0.2)},
            {"trial": c, "status": "ERROR", "config/optim/name": "sgd", "config/optim/lr": 1e-2,
             "config/optim/momentum": 0.9, "error": "RuntimeError: boom"}]
    pd.DataFrame(rows).drop(columns="training_iteration").to_csv(study / "trials.csv", index=False)
    return {"path": study, "trials": (a, b, c), "final": final, "b_matrix": b_matrix}


def test_letters_and_repeated_samples_share_a_variant():
    assert [letters(i) for i in (0, 1, 25, 26, 27)] == ["A", "B", "Z", "AA", "AB"]
    trials = pd.DataFrame({"trial": ["t_00000", "t_00001", "t_00002", "t_00003"],
                           "config/optim/lr": [0.1, 0.1, 0.01, 0.01], "config/seed": [0, 1, 0, 1],
                           "config/model": ["vgg16"] * 4})
    labelled = label_trials(trials)
    assert list(labelled["label"]) == ["A.1", "A.2", "B.1", "B.2"]
    assert list(labelled["setting"]) == ["optim/lr=0.1", "optim/lr=0.1", "optim/lr=0.01", "optim/lr=0.01"]


def test_embeddings_of_192_samples_and_collapsed_features():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(192, 64)).astype(np.float32)
    features[:96] += 3  # two clusters
    points = embed.tsne(features)
    assert points.shape == (192, 2) and np.isfinite(points).all()
    cluster = np.arange(192) >= 96
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1) + np.eye(192) * 1e9
    assert (cluster[distances.argmin(1)] == cluster).mean() > 0.95  # neighbours stay in their cluster
    assert embed.pca(features)[0].shape == (192, 2)
    # a collapsed VAE posterior (the same mu for every image) made sklearn's t-SNE segfault: refused instead
    collapsed = np.full((192, 16), 0.06, dtype=np.float32) + 1e-7 * rng.normal(size=(192, 16)).astype(np.float32)
    assert "collapsed" in embed.can_embed(collapsed)
    assert "NaN" in embed.can_embed(np.full((8, 3), np.nan))
    assert embed.can_embed(features) is None
    assert embed.default_perplexity(64) == 21 and embed.default_perplexity(192) == 30


@pytest.mark.parametrize("param, values", [("latent_dim", [2, 8, 32, 64]), ("optim/lr", [1e-4, 1e-3, 1e-2, 5e-2])])
def test_final_loss_against_a_swept_hyperparameter(param, values, tmp_path):
    table = pd.DataFrame({param: values, "status": ["OK"] * 3 + ["ERROR"], "epoch": [4, 4, 1, None],
                          "val/loss": [3.0, 2.0, 5.0, None], "val/kl": [0.1, 0.2, 0.3, None]})
    figure = figures.final_vs_param(table, param, ["val/loss", "val/kl"], "t")
    ax = figure.axes[0]
    assert ax.get_xscale() == "log"
    filled, hollow = ax.lines[0], ax.lines[1]  # ran every epoch vs stopped early by ASHA
    assert list(filled.get_ydata()) == [3.0, 2.0] and list(hollow.get_ydata()) == [5.0]
    assert_png(figures.save(figure, tmp_path / "swept.png"))


def test_loading_dedupes_epochs_and_fills_config_defaults(hand_study):
    study = load_study(hand_study["path"])
    a, b, c = hand_study["trials"]
    curve = read_results(hand_study["path"] / a)
    assert list(curve["epoch"]) == [1, 2, 3] and curve["val/precision"].tolist() == [0.3, 0.4, 0.5]
    assert set(study.curves["trial"]) == {a, b}  # the failed trial reported nothing
    # Adam's config dict had no momentum: it trained with OptimConfig's default, 0.0
    assert study.trials.set_index("trial").loc[b, "config/optim/momentum"] == 0.0
    assert study.artifacts(b).confusion is not None and not study.artifacts(b).get("features")
    with pytest.raises(FileNotFoundError, match="study.json"):
        load_study(hand_study["path"] / a)


def test_table_marks_the_best_and_keeps_failed_trials(hand_study):
    table = results_table(load_study(hand_study["path"]))
    assert list(table["label"]) == ["A", "B", "C"]
    assert list(table["status"]) == ["OK", "OK", "ERROR"]
    assert table["best"].tolist() == [True, False, False]
    assert {"optim/name", "optim/lr", "optim/momentum", "val/loss", "val/accuracy", "val/precision",
            "val/miou", "epoch", "rank", "trial"} <= set(table.columns)
    assert pd.isna(table.loc[2, "rank"])


def test_report_from_hand_built_study(hand_study):
    study = load_study(hand_study["path"])
    lines: list[str] = []
    report = build_report(study, perplexity=5, progress=lines.append)
    out = study.path / "report"
    write_markdown(report)
    write_html(report)
    for name in ("learning_curves", "confusion_matrices", "predictions", "tsne_A", "pca_A", "feature_maps"):
        assert_png(out / f"{name}.png")
    assert not (out / "tsne_B.png").exists()  # B stopped before writing features; C failed
    # B's matrix comes from its last (only) checkpoint; A's from its newest one
    np.testing.assert_array_equal(np.load(out / "data" / "confusion_B.npy"), hand_study["b_matrix"])
    np.testing.assert_array_equal(np.load(out / "data" / "confusion_A.npy"),
                                  hand_study["final"]["confusion_matrix.npy"])
    points = pd.read_csv(out / "data" / "embeddings.csv")
    assert points.groupby(["label", "tap", "method"]).size().eq(24).all()
    assert set(points["tap"]) == {"encoder_out", "decoder_mid"}
    assert any("t-SNE A" in line for line in lines)
    assert any("variant B" in note and "samples" in note for note in report.notes)
    page = (out / "index.html").read_text()
    assert page.count("<img") == len(list(out.glob("*.png")))
    assert "abcde_00000" in page and "RuntimeError: boom" in page
    assert "![Confusion matrices](confusion_matrices.png)" in (out / "report.md").read_text()


# ----------------------------------------------------------------------------- a real study, end to end
@pytest.fixture(scope="module")
def quick_study(quick_run):
    """seg_optimizers end to end (the session's shared --quick run), then ``python -m analysis`` on it."""
    run = quick_run("seg_optimizers")
    assert run["proc"].returncode == 0, run["proc"].stdout[-3000:] + run["proc"].stderr[-3000:]
    analysis = run_in_process("-m analysis", [str(run["dir"])], run["base"], run["env"])
    assert analysis.returncode == 0, analysis.stdout[-3000:] + analysis.stderr[-3000:]
    return {"folder": run["dir"], "report": run["dir"] / "report", "uri": run["uri"], "stdout": analysis.stdout}


@pytest.mark.slow
def test_quick_study_report_files(quick_study):
    report = quick_study["report"]
    assert f"report: {report / 'index.html'}" in quick_study["stdout"]
    assert "t-SNE" in quick_study["stdout"]  # progress for the slow part
    for name in ("learning_curves", "confusion_matrices", "predictions", "feature_maps",
                 *(f"{method}_{label}" for method in ("tsne", "pca") for label in "ABC")):
        assert_png(report / f"{name}.png")
    page = (report / "index.html").read_text()
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert "seg_optimizers" in page and page.count("<img") == len(list(report.glob("*.png")))
    trials = pd.read_csv(quick_study["folder"] / "trials.csv")
    table = pd.read_csv(report / "table.csv")
    assert len(table) == len(trials) == 3
    assert sorted(table["trial"]) == sorted(trials["trial"])
    assert {"label", "optim/name", "optim/lr", "optim/momentum", "status", "epoch", "train/loss", "val/loss",
            "val/accuracy", "val/precision", "val/miou", "rank", "best"} <= set(table.columns)
    best = table[table["best"]]
    assert len(best) == 1 and best["val/precision"].iloc[0] == table["val/precision"].max()
    assert "★" in (report / "table.md").read_text()


@pytest.mark.slow
def test_quick_study_figures_match_the_data(quick_study):
    from trainables.data import build_dataset

    report, folder = quick_study["report"], quick_study["folder"]
    params = json.loads(next(folder.glob("*/params.json")).read_text())
    val = build_dataset("shapes", "val", params["data_root"], 32)
    evaluated = sum(int((val[i][1] != 255).sum()) for i in range(len(val)))
    for label in "ABC":
        matrix = np.load(report / "data" / f"confusion_{label}.npy")
        assert matrix.shape == (K, K) and matrix.sum() == evaluated
    points = pd.read_csv(report / "data" / "embeddings.csv")
    for trial, rows in points.groupby("trial"):
        features = load_artifacts(folder / trial).get("features")
        for _, group in rows.groupby(["tap", "method"]):
            assert len(group) == len(features["labels"]) == params["feature_samples"]
            assert group["index"].tolist() == features["indices"].tolist()
            assert group["class"].tolist() == features["labels"].tolist()
    assert set(points["tap"]) == {"encoder_out", "decoder_mid"}


@pytest.mark.slow
def test_quick_study_report_run_in_mlflow(quick_study):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=quick_study["uri"])
    experiment = client.get_experiment_by_name("seg_optimizers")
    runs = client.search_runs([experiment.experiment_id], "tags.`vision_tune.report` = 'true'")
    assert len(runs) == 1 and runs[0].data.tags["vision_tune.study_run"] == "true"  # the study's parent run
    assert runs[0].info.run_name == "seg_optimizers"
    logged = {Path(f.path).name for f in client.list_artifacts(runs[0].info.run_id, "report")}
    assert {"index.html", "report.md", "table.csv", "confusion_matrices.png", "learning_curves.png"} <= logged
