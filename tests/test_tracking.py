"""MLflow as its users work in it: one parent run per study with named trial runs nested in it, data sets as
inputs, the final model loadable and registrable, the runs view's URL, and a sqlite store that concurrent
studies cannot break (the http server's side is in test_cluster.py, on that module's study)."""
from __future__ import annotations

import importlib
import json
import multiprocessing
import sqlite3
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from analysis.load import load_study
from analysis.tables import label_trials
from conftest import run_in_process, study_command
from studies.runner.tuner import study_variants
from studies.runner.mlflow_uri import check_reachable
from analysis.mlflow_store import (PARENT_TAG, BrokenStoreError, experiment_id, find_or_create_parent, open_client,
                                     repair_leftovers, runs_url, store_lock)
from analysis.naming import VariantNames

STUDY, MODEL_NAME = "vae_lr", "vae-lr-best"


# --- names: one lettering for MLflow and the analysis ---

@pytest.mark.parametrize("script, names", [
    ("seg_optimizers", ["A sgd lr=0.0001 momentum=0.9", "B sgd lr=0.001 momentum=0.9", "C adam lr=0.001"]),
    ("seg_concat", ["A skip_concat=True", "B skip_concat=False"]),
    ("vae_lr", ["A lr=0.005", "B lr=0.001", "C lr=0.0005", "D lr=0.0001", "E lr=5e-05"]),
])
def test_run_names_follow_tunes_grid_order(script, names):
    study = importlib.import_module(f"studies.{script}")
    configs, varied = study_variants(study.BASE, study.SPACE, "grid")
    namer = VariantNames(configs, varied)
    assert [namer.run_name(config) for config in configs] == names


def test_run_letters_equal_the_analysis_letters_on_a_two_dimensional_grid():
    """vae_losses' grid is loss x dataset; Tune orders it its own way (not itertools'), and trials.csv lists trials
    best first: the analysis, re-sorting by trial index, must give every trial the runner's letter."""
    study = importlib.import_module("studies.vae_losses")
    configs, varied = study_variants(study.BASE, study.SPACE, "grid")
    namer = VariantNames(configs, varied)
    trials = pd.DataFrame([{"trial": f"train_vae_ab12c_{index:05d}", **{f"config/{k}": v for k, v in config.items()}}
                           for index, config in enumerate(configs)]).sample(frac=1, random_state=0)
    labelled = label_trials(trials)
    assert len(set(labelled["variant"])) == len(configs) == 6
    for (_, row), variant in zip(trials.iterrows(), labelled["variant"]):
        config = {c[len("config/"):]: v for c, v in row.items() if c.startswith("config/")}
        assert namer.letter(config) == variant


def test_a_sampled_search_letters_settings_as_they_first_appear():
    study = importlib.import_module("studies.seg_search")
    configs, varied = study_variants(study.BASE, study.SPACE, "optuna")
    assert configs == [] and set(varied) == {"optim/name", "optim/lr", "class_weights", "skip_concat"}
    namer = VariantNames(configs, varied)
    first = {"optim/name": "adam", "optim/lr": 0.00123, "class_weights": 0.1, "skip_concat": True, "seed": 0}
    second = {**first, "optim/lr": 0.0005}
    assert [namer.letter(c) for c in (first, second, {**first, "seed": 7})] == ["A", "B", "A"]
    assert namer.run_name(first) == "A adam lr=0.00123 class_weights=0.1 skip_concat=True"


# --- the sqlite store: a lock against the creation race, leftovers repaired or refused ---

def _open_and_log(uri: str, study: str, start) -> None:
    start.wait()  # all four at once, on a database that does not exist yet
    client = open_client(uri)
    experiment = experiment_id(client, uri, study)
    parent = find_or_create_parent(client, experiment, study, f"/results/{study}", {"metric": "val/loss"})
    run = client.create_run(experiment, run_name="A base config", tags={"mlflow.parentRunId": parent})
    client.log_metric(run.info.run_id, "val/loss", 1.0, step=1)
    client.set_terminated(run.info.run_id)


def test_four_processes_open_a_new_sqlite_store_at_once(tmp_path):
    """What four studies started together do with MLflow first (without the lock their schema migrations race:
    'table _alembic_tmp_experiments already exists', and the file is left unusable)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    context = multiprocessing.get_context("fork")  # MLflow already imported: the four start within milliseconds
    start = context.Barrier(4)
    procs = [context.Process(target=_open_and_log, args=(uri, f"study{i}", start)) for i in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
    assert [proc.exitcode for proc in procs] == [0, 0, 0, 0]
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 8  # a parent and a trial run per study
        names = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
        assert not [name for name in names if name.startswith("_alembic_tmp")]
    assert (tmp_path / "mlflow.db.lock").is_file()


def _store_with_runs(tmp_path, runs: int):
    path = tmp_path / "mlflow.db"
    client = open_client(f"sqlite:///{path}")
    experiment = client.create_experiment("kept")
    for _ in range(runs):
        client.create_run(experiment)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE _alembic_tmp_experiments (experiment_id INTEGER)")
    return path


def test_an_empty_store_left_by_the_race_is_recreated(tmp_path):
    path = _store_with_runs(tmp_path, 0)
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM experiments WHERE name = 'kept'")
    with store_lock(path):
        repair_leftovers(path)
    assert not path.exists()  # nothing lost; the next open creates it whole (a new process: MLflow caches stores)
    done = subprocess.run([sys.executable, "-c", "import sys; from analysis.mlflow_store import open_client; "
                           "print(len(open_client(sys.argv[1]).search_experiments()))", f"sqlite:///{path}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split()[-1] == "1", done.stderr[-2000:]


def test_a_complete_store_keeps_its_runs_and_loses_the_leftovers(tmp_path):
    path = _store_with_runs(tmp_path, 2)
    with store_lock(path):
        repair_leftovers(path)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 2
        assert "_alembic_tmp_experiments" not in {n for (n,) in db.execute("SELECT name FROM sqlite_master")}


def test_a_half_migrated_store_with_runs_is_refused_with_the_fix(tmp_path):
    path = _store_with_runs(tmp_path, 1)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE alembic_version SET version_num = 'a8c4a736bde6'")  # a migration that never finished
    with pytest.raises(BrokenStoreError) as caught:
        repair_leftovers(path)
    message = str(caught.value)
    for part in (str(path), "_alembic_tmp_experiments", "1 run(s)", f"cp {path} {path}.bak",
                 f"sqlite3 {path} 'DROP TABLE _alembic_tmp_experiments'", f"mlflow db upgrade sqlite:///{path}"):
        assert part in message, message
    with sqlite3.connect(path) as db:  # refused, not touched
        assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1


def test_a_study_refuses_a_broken_store_before_ray_starts(tmp_path):
    path = _store_with_runs(tmp_path, 1)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE alembic_version SET version_num = 'a8c4a736bde6'")
    with pytest.raises(BrokenStoreError, match=r"^--mlflow-uri sqlite:///.*half-migrated"):
        check_reachable(f"sqlite:///{path}")  # run_study's check before Ray starts


def test_runs_url_opens_the_model_training_view():
    assert runs_url("sqlite:////x/mlflow.db", "7") == \
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert runs_url("http://head:5000/", "3").startswith("http://head:5000/#/experiments/3/runs?")


# --- a real study on sqlite: parent, names, inputs, model, registry, resume, report ---

@pytest.fixture(scope="module")
def sqlite_study(quick_run):
    """vae_lr end to end with --register-model (the session's shared --quick run), resumed once it has finished,
    then ``python -m analysis`` on it."""
    run = quick_run(STUDY)
    first = run["proc"]
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert run["args"][run["args"].index("--register-model") + 1] == MODEL_NAME
    # the user's MLFLOW_TRACKING_URI pointed elsewhere: --mlflow-uri is the study's store, registry included
    assert not (run["base"] / "elsewhere.db").exists()
    resumed = subprocess.run(study_command(STUDY, *run["args"], "--resume"), cwd=run["base"], env=run["env"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    report = run_in_process("-m analysis", [str(run["dir"])], run["base"], run["env"])
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    return {"uri": run["uri"], "dir": run["dir"], "out": first.stdout, "resumed": resumed.stdout,
            "report": report.stdout}


def _runs(uri: str):
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(STUDY)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get(PARENT_TAG) == "true"]
    return client, experiment, parents, [r for r in runs if r not in parents]


@pytest.mark.slow
def test_one_parent_run_with_every_trial_nested_and_named(sqlite_study):
    client, _, parents, trials = _runs(sqlite_study["uri"])
    assert len(parents) == 1 and len(trials) == 5  # after --resume too: no second parent, no duplicate trial
    parent = parents[0]
    assert parent.info.run_name == STUDY and parent.info.status == "FINISHED"
    assert parent.data.params["metric"] == "val/loss" and parent.data.params["mode"] == "min"
    assert parent.data.params["model"] == "conv_vae" and "--register-model" in parent.data.params["argv"]
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}
    assert {d.dataset.name for d in parent.inputs.dataset_inputs} == {"mnist5k"}  # the Dataset column of its row
    # named as the analysis letters its trials
    study = load_study(sqlite_study["dir"])
    labelled = label_trials(study.trials)
    by_trial = {r.data.tags["vision_tune.trial_id"]: r for r in trials}
    for _, row in labelled.iterrows():
        run = by_trial["_".join(row["trial"].split("_")[-2:])]
        lr = float(run.data.params["optim/lr"])
        assert run.info.run_name == f"{row['variant']} lr={lr:.4g}", (run.info.run_name, row["variant"])
    # the best trial on the parent, as the runner's table says
    best = labelled.sort_values("val/loss").iloc[0]
    assert parent.data.tags["vision_tune.best_trial"] == "_".join(best["trial"].split("_")[-2:])
    assert parent.data.metrics["best/val/loss"] == pytest.approx(best["val/loss"])
    # the report went to the parent, not to a sibling run
    assert "report/index.html" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}


@pytest.mark.slow
def test_trials_log_their_data_sets_as_inputs(sqlite_study):
    _, _, _, trials = _runs(sqlite_study["uri"])
    for run in trials:
        inputs = {tag.value: d.dataset for d in run.inputs.dataset_inputs for tag in d.tags
                  if tag.key == "mlflow.data.context"}
        assert set(inputs) == {"training", "validation"}, run.info.run_name
        for context, dataset in inputs.items():
            assert dataset.name == "mnist5k" and len(dataset.digest) == 16
            assert json.loads(dataset.source)["uri"].endswith("mnist_5k.csv.gz")
            assert json.loads(dataset.profile)["num_rows"] == {"training": 4000, "validation": 1000}[context]
    assert len({d.dataset.digest for r in trials for d in r.inputs.dataset_inputs}) == 2  # same data, same digests


@pytest.mark.slow
def test_the_final_model_loads_on_cpu_predicts_and_is_registered(sqlite_study):
    import mlflow.pytorch

    client, _, parents, trials = _runs(sqlite_study["uri"])
    best_run = parents[0].data.tags["vision_tune.best_run"]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(sqlite_study["uri"])  # runs:/ URIs resolve through the global tracking URI
    try:
        model = mlflow.pytorch.load_model(f"runs:/{best_run}/model", map_location="cpu")
        info = mlflow.models.get_model_info(f"runs:/{best_run}/model")
        local = mlflow.artifacts.download_artifacts(f"runs:/{best_run}/model")
    finally:
        mlflow.set_tracking_uri(previous)
    recon = model(torch.rand(3, 1, 28, 28))
    assert recon.shape == (3, 1, 28, 28) and bool(((recon >= 0) & (recon <= 1)).all())
    assert json.loads(info.signature.to_dict()["inputs"])[0]["tensor-spec"]["shape"] == [-1, 1, 28, 28]
    assert np.asarray(mlflow.models.Model.load(local).load_input_example(local)).shape == (1, 1, 28, 28)
    for run in trials:  # every finished trial's artifacts; the model, built from its weights, the best trial's only
        assert "artifacts/meta.json" in {a.path for a in client.list_artifacts(run.info.run_id, "artifacts")}
        assert not client.list_artifacts(run.info.run_id, "checkpoint")  # the weights stay in Tune's checkpoints
        assert [m.name for m in client.search_logged_models([run.info.experiment_id],
                                                            filter_string=f"source_run_id = '{run.info.run_id}'")] \
            == (["model"] if run.info.run_id == best_run else [])
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", best_run)]  # not registered again on --resume
    assert f"registered: model '{MODEL_NAME}' version 1" in sqlite_study["out"]
    assert f"registered: model '{MODEL_NAME}' version 1" in sqlite_study["resumed"]


@pytest.mark.slow
def test_trials_report_system_figures(sqlite_study):
    client, _, _, trials = _runs(sqlite_study["uri"])
    for run in trials:
        assert 50 < run.data.metrics["system/peak_rss_mib"] < 64_000 and run.data.metrics["images_per_s"] > 0


@pytest.mark.slow
def test_the_summary_prints_the_runs_view_of_an_experiment_that_exists(sqlite_study):
    _, experiment, _, _ = _runs(sqlite_study["uri"])
    url = f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    assert f"mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri {sqlite_study['uri']}" in sqlite_study["out"]
    assert url in sqlite_study["out"] and url in sqlite_study["report"]


# --- what a trial reports about itself ---

def test_a_file_digest_changes_with_any_file_and_not_with_the_root(tmp_path):
    from trainables.lineage import _file_digest

    def digest(root):
        return _file_digest([str(p) for p in root.rglob("*.png")], root)

    for root in (tmp_path / "a", tmp_path / "b"):
        (root / "masks").mkdir(parents=True)
        (root / "masks" / "1.png").write_bytes(b"x" * 10)
        (root / "2.png").write_bytes(b"y" * 20)
    same = digest(tmp_path / "a")
    assert same == digest(tmp_path / "b")  # a copied data set keeps its digest
    (tmp_path / "b" / "masks" / "1.png").write_bytes(b"x" * 11)
    assert digest(tmp_path / "b") != same


def test_embedded_sets_describe_their_split_size_and_source(data_root):
    from trainables import ClassifyConfig
    from trainables.data import build_dataset
    from trainables.lineage import dataset_inputs

    config = ClassifyConfig(model="resnet18", dataset="digits", image_size=8, val_samples=100, data_root=str(data_root))
    train, val = (build_dataset("digits", split, data_root, 8) for split in ("train", "val"))
    described = json.loads(dataset_inputs(config, train, val))
    assert [(d["split"], d["context"], d["size"]) for d in described] == [("train", "training", len(train)),
                                                                           ("val", "validation", 100)]
    assert described[0]["digest"] != described[1]["digest"] and described[0]["source"].endswith("digits.csv.gz")


def test_system_figures_report_this_processs_peak_memory():
    from trainables.system import SystemMonitor

    monitor = SystemMonitor(torch.device("cpu"))
    before = monitor.epoch_figures()["system/peak_rss_mib"]
    block = np.ones(300 * 2**20 // 8)  # 300 MiB touched
    after = monitor.epoch_figures()["system/peak_rss_mib"]
    monitor.close()
    assert after - before > 250 and block.sum() > 0


def test_the_driver_builds_the_model_from_a_trials_final_checkpoint(tmp_path):
    """A finished trial's checkpoint (weights only, and one input) becomes an MLflow model folder on the driver:
    pins read from the running modules (MLflow's own check of them, seconds per process, is skipped and put
    back), the trial's weights (same outputs), a VAE served as one tensor, any batch size."""
    import mlflow
    import mlflow.pytorch
    import torchvision
    from mlflow.utils import environment

    from studies.runner.export import export_checkpoint, exportable
    from trainables import VAEConfig
    from trainables.checkpoints import EXAMPLE_FILE, save_state
    from vision_models import build_model
    from vision_models.vae import Reconstruction

    config = VAEConfig(dataset="mnist5k", image_size=28, latent_dim=2)
    torch.manual_seed(3)
    model = build_model("conv_vae", **config.model_kwargs()).eval()
    (tmp_path / "checkpoint").mkdir()
    save_state(tmp_path / "checkpoint", model, None, None, epoch=4, final=True)
    assert not exportable(tmp_path / "checkpoint")  # no example input yet
    example = torch.rand(1, 1, 28, 28)
    torch.save(example, tmp_path / "checkpoint" / EXAMPLE_FILE)
    check = environment.warn_dependency_requirement_mismatches
    folder = export_checkpoint("generation", config.to_dict(), tmp_path / "checkpoint", tmp_path / "model")
    assert environment.warn_dependency_requirement_mismatches is check
    pins = set((folder / "requirements.txt").read_text().split())
    assert {f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}",
            f"numpy=={np.__version__}", f"mlflow=={mlflow.__version__}"} <= pins, pins
    loaded = mlflow.pytorch.load_model(str(folder), map_location="cpu")
    images = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded(images), Reconstruction(model)(images))  # the trial's weights, batch of 3


def test_closing_an_interrupted_studys_runs_leaves_another_study_of_the_same_name_running(tmp_path):
    """Two studies named alike (two storage folders) share an MLflow experiment; an interrupted one closes only its
    own trials' runs as KILLED, while the other's trial runs on."""
    from studies.runner.tracking import StudyTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trackers, runs = [], []
    for folder in ("first", "second"):
        tracker = StudyTracker(uri, STUDY)
        tracker.plan(str(tmp_path / folder / STUDY), {"storage": folder}, [{"optim/lr": 5e-4}])
        runs.append(tracker.start(f"{folder}_00000", f"train_vae_{folder}_00000", {"optim": {"lr": 5e-4}}))
        trackers.append(tracker)
    first, second = trackers
    assert first.parent_run_id() != second.parent_run_id()
    assert first.kill_unfinished() == 1
    client = MlflowClient(uri)
    assert [client.get_run(run_id).info.status for run_id in runs] == ["KILLED", "RUNNING"]
