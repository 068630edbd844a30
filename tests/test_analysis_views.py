"""The report's comparison views (parallel coordinates, hyperparameter importance, every trial's curves), the
index page over a storage folder, and ``--watch``: on study folders written here in the runner's layout."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.__main__ import main, parse_args, write_report
from analysis.html import mark_stopped
from analysis.importance import MIN_TRIALS, param_importance
from analysis.load import load_study
from analysis.variants import study_verdict
from analysis.watch import watch
from test_analysis import assert_png

EPOCHS = 3
FINDING = {"claim": "Adam trains best", "section": "V-B", "metric": "val/accuracy", "mode": "max",
           "best": {"optim/name": "adam"}}


def _accuracy(lr: float, epoch: int, seed: int) -> float:
    """Best at lr = 10^-2.5, whatever the batch size or optimizer: the importance must find lr."""
    return 0.9 - 0.08 * (np.log10(lr) + 2.5) ** 2 - 0.1 * (EPOCHS - epoch) + 0.003 * seed


def _epoch(epoch: int, accuracy: float) -> dict:
    return {"epoch": epoch, "training_iteration": epoch, "train/loss": 2.0 - accuracy, "val/loss": 2.1 - accuracy,
            "val/accuracy": accuracy, "val/precision": accuracy - 0.05}


def write_study(storage: Path, name: str, settings: list[dict], state: str = "finished",
                finding: dict | None = None) -> Path:
    """A classification study as the runner leaves it: study.json, a folder per trial (params.json, result.json,
    error.txt) and, once it ended, trials.csv. ``settings``: per trial optim/lr, batch_size, optim/name, seed,
    epochs run, status."""
    study = storage / name
    study.mkdir(parents=True)
    rows = []
    for index, s in enumerate(settings):
        trial = f"train_classifier_f00d{index % 10}_{index:05d}_{index}_2026-01-01_00-00-00"
        config = {"model": "vgg11", "dataset": "shapes", "epochs": EPOCHS, "batch_size": s["batch_size"],
                  "seed": s["seed"], "optim": {"name": s["optim"], "lr": s["lr"]}}
        (study / trial).mkdir()
        (study / trial / "params.json").write_text(json.dumps(config))
        reports = [_epoch(e, _accuracy(s["lr"], e, s["seed"])) for e in range(1, s.get("ran", EPOCHS) + 1)]
        (study / trial / "result.json").write_text("".join(json.dumps(r) + "\n" for r in reports))
        status = s.get("status", "OK")
        if status == "ERROR":
            (study / trial / "error.txt").write_text("RuntimeError: CUDA out of memory")
        rows.append({"trial": trial, "status": status, "config/epochs": EPOCHS, "config/batch_size": s["batch_size"],
                     "config/seed": s["seed"], "config/optim/name": s["optim"], "config/optim/lr": s["lr"],
                     **({k: v for k, v in reports[-1].items() if k != "training_iteration"} if reports else {})})
    info = {"name": name, "task": "classification", "metric": "val/accuracy", "mode": "max", "mlflow_uri": None,
            "base": {"epochs": EPOCHS}, "argv": [f"studies/{name}.py", "--quick"], "finding": finding,
            "state": state, "invocations": [{"host": socket.gethostname(), "pid": os.getpid(), "state": state,
                                             "cwd": str(storage)}]}
    (study / "study.json").write_text(json.dumps(info))
    if state != "running":
        pd.DataFrame(rows).to_csv(study / "trials.csv", index=False)
    return study


def search_settings() -> list[dict]:
    """14 full-budget OK trials (12 settings, the first run with 3 seeds), one stopped early by ASHA, one failed."""
    rng = np.random.default_rng(1)
    lrs = 10 ** rng.uniform(-4, -1, 12)
    settings = [{"lr": float(lr), "batch_size": int(rng.choice([8, 16, 32])), "optim": str(rng.choice(["sgd", "adam"])),
                 "seed": 0} for lr in lrs]
    settings += [{**settings[0], "seed": 1}, {**settings[0], "seed": 2}]
    settings.append({**settings[1], "seed": 1, "ran": 1})  # ASHA stopped it after one epoch
    settings.append({**settings[2], "seed": 1, "ran": 2, "status": "ERROR"})
    return settings


def small_settings() -> list[dict]:
    """Three trials, one seed each: too few for importance."""
    return [{"lr": 1e-3, "batch_size": 16, "optim": "sgd", "seed": 0},
            {"lr": 1e-3, "batch_size": 16, "optim": "adam", "seed": 0},
            {"lr": 1e-2, "batch_size": 16, "optim": "adam", "seed": 0}]


def test_importance_finds_the_parameter_that_matters_and_says_when_it_cannot(tmp_path):
    study = load_study(write_study(tmp_path, "cls_search", search_settings()))
    params = ["config/optim/lr", "config/batch_size", "config/optim/name"]
    result = param_importance(study.trials, params, "val/accuracy", "max")
    assert result.reason is None and result.trials == 14 and len(result.left_out) == 1  # ASHA's trial left out
    assert set(result.table["param"]) == {"optim/lr", "batch_size", "optim/name"}
    assert result.table["param"].iloc[0] == "optim/lr" and result.table["importance"].iloc[0] > 0.6
    assert result.table["importance"].sum() == pytest.approx(1.0)
    assert "log" in result.table.set_index("param").loc["optim/lr", "distribution"]
    too_few = param_importance(study.trials.head(MIN_TRIALS - 1), params, "val/accuracy", "max")
    assert too_few.table.empty and f"at least {MIN_TRIALS}" in too_few.reason
    one = param_importance(study.trials, ["config/optim/lr"], "val/accuracy", "max")
    assert "at least 2" in one.reason and "optim/lr" in one.reason
    ped = param_importance(study.trials, params, "val/accuracy", "max", "ped-anova")
    assert "PED-ANOVA needs at least 50" in ped.reason


def test_report_draws_every_trial_the_parameters_and_their_importance(tmp_path):
    folder = write_study(tmp_path, "cls_search", search_settings())
    assert main([str(folder), "--no-mlflow"]) == 0
    out = folder / "report"
    for name in ("parallel_coordinates", "importance", "learning_curves", "learning_curves_trials"):
        assert_png(out / f"{name}.png")
    importance = pd.read_csv(out / "data" / "importance.csv")
    assert set(importance["param"]) == {"optim/lr", "batch_size", "optim/name"}
    page = (out / "index.html").read_text()
    assert "Hyperparameter importance not computed" not in page and "<td>optim/lr</td>" in page
    assert "all 16 trials that reported" in page  # the stopped and the failed trial are drawn too
    assert page.count("<img") == len(list(out.glob("*.png")))
    assert "![Parallel coordinates](parallel_coordinates.png)" in (out / "report.md").read_text()


def test_too_few_trials_get_a_note_in_place_of_importance(tmp_path):
    folder = write_study(tmp_path, "cls_small", small_settings())
    assert main([str(folder), "--no-mlflow"]) == 0
    out = folder / "report"
    assert_png(out / "parallel_coordinates.png")
    assert not (out / "importance.png").exists() and not (out / "learning_curves_trials.png").exists()
    page = (out / "index.html").read_text()
    assert re.search(r"Hyperparameter importance not computed: 3 finished trial\(s\): fANOVA needs at least 10", page)
    assert "Thresholds: at least 10 trials that ran their whole budget and 2 hyperparameters" in page


def test_index_lists_every_study_with_its_verdict_and_a_working_link(tmp_path):
    storage = tmp_path / "results"
    write_study(storage, "cls_search", search_settings(), finding=FINDING)
    write_study(storage, "cls_small", small_settings(), finding=FINDING)
    (storage / "cls_starting").mkdir()  # a study that has written study.json and no trial yet
    (storage / "cls_starting" / "study.json").write_text(json.dumps({"name": "cls_starting", "state": "running"}))
    (storage / "not_a_study").mkdir()
    (storage / "studies").mkdir()  # the script the runner recorded in study.json, where its command ran
    script = '"""Which learning rate trains\nthe classifier best?\n\nHow to run it."""\n'
    (storage / "studies" / "cls_search.py").write_text(script)
    assert main([str(storage), "--no-mlflow"]) == 0
    page = (storage / "index.html").read_text()
    rows = pd.read_csv(storage / "studies.csv").set_index("name")
    assert list(rows.index) == ["cls_search", "cls_small", "cls_starting"]
    for name in ("cls_search", "cls_small"):
        verdict = study_verdict(load_study(storage / name)).verdict
        assert rows.loc[name, "verdict"] == verdict
        link = rows.loc[name, "page"]
        assert link == f"{name}/report/index.html" and f"<a href='{link}'>{name}</a>" in page
        assert (storage / link).is_file() and f"Study {name}" in (storage / link).read_text()
    assert "no trials yet" in rows.loc["cls_starting", "problem"]
    assert rows.loc["cls_search", "question"] == "Which learning rate trains the classifier best?"
    assert rows.loc["cls_small", "question"] == "claim: Adam trains best"  # no script: the finding's claim
    assert rows.loc["cls_small", "best"].startswith(("A:", "B:", "C:"))
    assert rows.loc["cls_small", "metric"].startswith("val/accuracy ")
    assert rows.loc["cls_search", "trials"] == "15 OK of 16"
    # a second run keeps the pages that are newer than their results
    written = (storage / "cls_small" / "report" / "index.html").stat().st_mtime_ns
    assert main([str(storage), "--no-mlflow"]) == 0
    assert (storage / "cls_small" / "report" / "index.html").stat().st_mtime_ns == written


def test_index_of_a_storage_uri(tmp_path):
    """A storage given as a URI (file:// here; s3:// reads the same way through pyarrow): pages in --out."""
    storage = tmp_path / "bucket"
    write_study(storage, "cls_small", small_settings(), finding=FINDING)
    out = tmp_path / "pages"
    assert main([storage.as_uri(), "--no-mlflow", "--out", str(out)]) == 0
    assert (out / "cls_small" / "index.html").is_file()
    assert "<a href='cls_small/index.html'>cls_small</a>" in (out / "index.html").read_text()


def test_index_of_an_s3_storage(tmp_path, monkeypatch):
    """s3://bucket/prefix of studies, against moto's S3 server: each study copied, its page in ./report/<name>."""
    from servers import s3_server

    storage = tmp_path / "local"
    write_study(storage, "cls_small", small_settings(), finding=FINDING)
    write_study(storage, "cls_other", small_settings()[:2])
    with s3_server() as s3:
        for key, value in s3.env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
        s3.make_bucket("studies")
        client = s3.client()
        for path in storage.rglob("*"):
            if path.is_file():
                client.upload_file(str(path), "studies", f"vt/{path.relative_to(storage).as_posix()}")
        monkeypatch.chdir(tmp_path)
        assert main(["s3://studies/vt", "--no-mlflow"]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    for name in ("cls_other", "cls_small"):
        assert f"<a href='{name}/index.html'>{name}</a>" in page
        assert (tmp_path / "report" / name / "index.html").is_file()
    assert "s3://studies/vt/cls_small" in (tmp_path / "report" / "cls_small" / "index.html").read_text()


def test_watch_writes_a_live_page_then_the_final_one(tmp_path):
    folder = write_study(tmp_path, "cls_live", small_settings()[:2], state="running")
    page = folder / "report" / "index.html"
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "code", main([str(folder), "--watch", "--watch-interval", "0.3", "--no-mlflow"])))
    thread.start()
    deadline = time.time() + 60
    while not (page.is_file() and "LIVE" in page.read_text()):
        assert time.time() < deadline and thread.is_alive(), "no live page"
        time.sleep(0.1)
    live = page.read_text()
    assert "http-equiv='refresh' content='1'" in live and re.search(r"Written at \d{4}-\d\d-\d\dT", live)
    assert "state: <code>running</code>" in live
    info = json.loads((folder / "study.json").read_text())
    (folder / "study.json").write_text(json.dumps({**info, "state": "finished"}))
    thread.join(timeout=60)
    assert not thread.is_alive() and result["code"] == 0
    final = page.read_text()
    assert "LIVE" not in final and "refresh" not in final and "state: <code>finished</code>" in final


def test_watch_stopped_by_ctrl_c_says_the_page_is_no_longer_live(tmp_path):
    folder = write_study(tmp_path, "cls_live", small_settings(), state="running")

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    args = parse_args([str(folder), "--watch", "--no-mlflow"])
    assert watch(args, lambda line: None, write_report, sleep=interrupt) == 130
    page = (folder / "report" / "index.html").read_text()
    assert "Not live" in page and "LIVE" not in page and "refresh" not in page
    assert not mark_stopped(folder / "report" / "index.html")  # already stopped


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(CHROMIUM is None, reason="no /usr/bin/chromium (Debian's package) to render the page")
def test_page_renders_in_headless_chromium(tmp_path):
    folder = write_study(tmp_path, "cls_search", search_settings(), finding=FINDING)
    assert main([str(folder), "--no-mlflow"]) == 0
    shot = tmp_path / "page.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
                    (folder / "report" / "index.html").as_uri()], check=True, timeout=120, capture_output=True)
    assert_png(shot, min_side=1000)
