"""Every study script end to end with --quick (subprocess, real Ray, real MLflow sqlite), and the runner's
guarantees: spaces as the report, resume without reruns or duplicate runs, early failures."""
from __future__ import annotations

import importlib
import json
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import FAST, LABEL_KEYS, ROOT, VAE_KEYS, fast_flags, run_in_process, study_command
from studies.runner.space import variants

# the report's variants per script (issue 5's table); keys are the fields a study varies
EXPECTED = {
    "cls_architectures": [{"model": m, "optim.lr": lr} for m in ("vgg16", "resnet18") for lr in (0.1, 0.05)],
    "vae_losses": [{"loss": loss, "dataset": d} for loss in ("bce", "mse", "bce+mse") for d in ("mnist", "cifar10")],
    "vae_latent": [{"latent_dim": n} for n in (2, 4, 8, 16, 32, 64)],
    "vae_lr": [{"optim.lr": lr} for lr in (5e-3, 1e-3, 5e-4, 1e-4, 5e-5)],
    "segnet_optimizers": [{"optim.name": "sgd", "optim.momentum": 0.0}, {"optim.name": "sgd", "optim.momentum": 0.9},
                          {"optim.name": "adam", "optim.momentum": 0.0}],
    "seg_optimizers": [{"optim.name": "sgd", "optim.lr": 1e-4, "optim.momentum": 0.9, "class_weights": 0.1},
                       {"optim.name": "sgd", "optim.lr": 1e-3, "optim.momentum": 0.9, "class_weights": 0.1},
                       {"optim.name": "adam", "optim.lr": 1e-3, "optim.momentum": 0.0, "class_weights": 0.1}],
    "seg_class_weights": [{"class_weights": w, "optim.lr": 1e-4} for w in ("none", 0.1, 0.01, "inverse_frequency")],
    "seg_concat": [{"skip_concat": True}, {"skip_concat": False}],
}
TRIALS = {**{name: len(v) for name, v in EXPECTED.items()}, "vae_losses": 3, "seg_search": 4}


@pytest.fixture(scope="module", autouse=True)
def one_ray_runtime(ray_runtime):
    """This module's in-process studies join one Ray runtime, as a study run from a notebook with Ray up does (the
    runner starts and stops Ray only when none is up): one start instead of nine, ~8 s and 8 CPU-seconds each.
    Its subprocess studies start their own, as from a shell."""
    yield ray_runtime


def _get(config, dotted: str):
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_space_is_the_reports(script):
    """The typed configs a script's space expands to are exactly the report's variants, nothing extra."""
    study = importlib.import_module(f"studies.{script}")
    configs = [type(study.BASE).from_dict(values) for values in variants(study.BASE, study.SPACE)]
    keys = list(EXPECTED[script][0])
    got = sorted(repr([_get(config, key) for key in keys]) for config in configs)
    assert got == sorted(repr([want[key] for key in keys]) for want in EXPECTED[script])


def run_script(script: str, tmp_path, env, *extra: str) -> subprocess.CompletedProcess:
    """The script with --quick and the small sizes, in this process (its exit code and output as a command's)."""
    storage, db = tmp_path / "results", tmp_path / "mlflow.db"
    args = ["--quick", "--storage", str(storage), "--mlflow-uri", f"sqlite:///{db}", *fast_flags(script), *extra]
    return run_in_process(str(ROOT / "studies" / f"{script}.py"), args, tmp_path, env)


def mlflow_runs(tmp_path, name: str):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no MLflow experiment {name}"
    runs = client.search_runs([experiment.experiment_id], "tags.`vision_tune.study` != ''")
    return client, [run for run in runs if "vision_tune.trial_id" in run.data.tags]  # the study's parent run aside


def assert_complete(storage, client, runs, script: str, trials: int) -> None:
    """Every trial OK in the table, once in MLflow, FINISHED with each epoch and its checkpoint logged."""
    table = pd.read_csv(storage / "trials.csv")
    assert len(table) == trials and (table["status"] == "OK").all()
    expected = VAE_KEYS if script.startswith("vae") else LABEL_KEYS
    for trial in table["trial"]:  # each epoch's report has every key, the last checkpoint the t-SNE features
        reports = [json.loads(line) for line in (storage / trial / "result.json").read_text().splitlines()]
        assert all(expected <= set(report) for report in reports), (trial, expected - set(reports[-1]))
        last = sorted((storage / trial).glob("checkpoint_*"))[-1]
        finished = reports[-1]["epoch"] == json.loads((storage / trial / "params.json").read_text())["epochs"]
        assert (last / "artifacts" / "features.npz").is_file() == finished, last  # not an ASHA-stopped trial's
    assert len(runs) == trials  # no duplicate MLflow runs
    if script == "seg_search":  # Optuna: every trial its own seed, the one MLflow records
        assert table["config/seed"].nunique() == len(table)
        assert sorted(int(run.data.params["seed"]) for run in runs) == sorted(table["config/seed"])
    for run in runs:
        assert run.info.status == "FINISHED"
        assert "optim/lr" in run.data.params and "model" in run.data.params
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")]
        if script != "seg_search":  # ASHA may stop a trial after its first epoch
            assert steps == [1, 2]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "artifacts")}
        assert "artifacts/meta.json" in artifacts


# vae_latent's end-to-end run is the resume test's (its driver killed, then resumed to the end)
@pytest.mark.parametrize("script", sorted(set(TRIALS) - {"vae_latent"}))
def test_study_runs_end_to_end_with_quick(script, quick_run):
    run = quick_run(script)
    done = run["proc"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_complete(run["dir"], *mlflow_runs(run["base"], script), script, TRIALS[script])


def _final_meta(trial: Path) -> Path:
    """The artifacts' meta.json of a finished trial's last checkpoint."""
    return sorted(trial.glob("checkpoint_*"))[-1] / "artifacts" / "meta.json"


def recorded_finished(storage) -> list[str]:
    """Trial folders that Tune's newest experiment snapshot on storage records as TERMINATED."""
    snapshots = sorted(storage.glob("experiment_state-*.json"))
    try:
        trials = [json.loads(state) for state, _ in json.loads(snapshots[-1].read_text())["trial_data"]]
    except (IndexError, ValueError, OSError):  # none yet, or caught mid-write
        return []
    return [t["relative_logdir"] for t in trials if t["status"] == "TERMINATED"]


def test_resume_after_the_driver_is_killed_reruns_nothing(tmp_path, study_env):
    storage = tmp_path / "results" / "vae_latent"
    args = ["--quick", "--storage", str(tmp_path / "results"), "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--max-concurrent", "1", *FAST["vae"],
            "--checkpoint-every", "1"]  # a checkpoint an epoch: Tune snapshots the study as often
    driver = subprocess.Popen(study_command("vae_latent", *args), cwd=tmp_path, env=study_env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(recorded_finished(storage)) < 2 and driver.poll() is None:
        time.sleep(0.1)
    import os
    import signal

    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started die at once
    driver.wait()
    # finished = what Tune's experiment snapshot records as TERMINATED; a trial that ended after the last
    # snapshot is redone from its last recorded checkpoint (its results are the same, none is lost)
    finished = {name: _final_meta(storage / name).stat().st_mtime for name in recorded_finished(storage)}
    assert 2 <= len(finished) < 6, "the study must be interrupted with trials finished and trials to go"
    time.sleep(2)
    done = subprocess.run(study_command("vae_latent", *args, "--resume"), cwd=tmp_path, env=study_env,
                          capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for trial, mtime in finished.items():  # finished trials were not run again
        assert _final_meta(storage / trial).stat().st_mtime == mtime
    for results in storage.glob("*/result.json"):  # no epoch lost from Tune's results
        epochs = [json.loads(line)["epoch"] for line in results.read_text().splitlines()]
        assert sorted(set(epochs)) == [1, 2], (results.parent.name, epochs)
    assert_complete(storage, *mlflow_runs(tmp_path, "vae_latent"), "vae_latent", TRIALS["vae_latent"])


def test_more_gpus_than_the_cluster_has_fails_within_seconds(tmp_path, study_env):
    start = time.time()
    # a process of its own: its own Ray, GPU-less (in this process a test's Ray may offer logical GPUs)
    done = subprocess.run(study_command("seg_concat", "--quick", "--storage", str(tmp_path / "results"), "--mlflow-uri",
                                        f"sqlite:///{tmp_path / 'mlflow.db'}", *fast_flags("seg_concat"),
                                        "--gpus-per-trial", "1"), cwd=tmp_path, env=study_env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    assert "--gpus-per-trial 1" in done.stderr and "GPU" in done.stderr
    assert time.time() - start < 90
    assert not list((tmp_path / "results").glob("seg_concat/*/result.json"))  # no trial started


def test_a_study_whose_checkpoints_cannot_fit_fails_before_ray_starts(tmp_path, study_env):
    # 3 optimizers x 10^5 samples x 2 kept checkpoints of SegNet (up to 338 MiB each with Adam: 675 MiB a trial): no disk holds it
    done = run_script("segnet_optimizers", tmp_path, study_env, "--num-samples", "100000")
    assert done.returncode != 0
    assert "not enough disk" in done.stderr and "--storage" in done.stderr and "675 MiB" in done.stderr
    assert not (tmp_path / "results" / "segnet_optimizers").exists()


def test_disk_check_counts_kept_checkpoints_and_mlflow_copies_on_the_same_disk(tmp_path):
    import shutil

    from studies.runner.preflight import KEEP_CHECKPOINTS, StorageError, check_disk, study_bytes
    from studies.runner.mlflow_uri import local_artifact_root

    free = shutil.disk_usage(tmp_path).free
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    state = int(free / (KEEP_CHECKPOINTS + 0.5))  # the kept checkpoints fit (0.8x free), with MLflow's not (1.2x)
    results, models = study_bytes(state, state, 1, 10, "auto", "best")
    assert (results, models) == (KEEP_CHECKPOINTS * state, state)
    assert study_bytes(state, state // 3, 4, 10, "10", "all") == (4 * (state // 3), 4 * (state // 3))  # final only
    assert study_bytes(state, state // 3, 4, 10, "2", "none") == (4 * KEEP_CHECKPOINTS * state, 0)
    check_disk(0, models, 1, "s3://bucket/results", uri)  # MLflow's copies alone fit
    check_disk(results, models, 1, str(tmp_path / "results"), "http://127.0.0.1:5000")  # Tune's alone fit
    with pytest.raises(StorageError, match=r"--storage .*results.* \+ --mlflow-uri's artifacts .*mlartifacts"):
        check_disk(results, models, 1, str(tmp_path / "results"), uri)  # both on one disk do not
    check_disk(0, 10 * free, 1, "s3://bucket/results", "http://127.0.0.1:5000")  # a bucket and a server
    with pytest.raises(StorageError, match=r"the local staging folder \(TMPDIR\) "):  # where trials stage uploads
        check_disk(10 * free, 0, 1, "s3://bucket/results", "http://127.0.0.1:5000")
    assert local_artifact_root(uri) == tmp_path / "mlartifacts"
    assert local_artifact_root((tmp_path / "mlruns").as_uri()) == local_artifact_root(str(tmp_path / "mlruns"))
    assert local_artifact_root("databricks") is None
    check_disk(0, free, 1, "s3://bucket/results", "http://127.0.0.1:5000")  # only the staging folder is local


def test_study_files_are_written_to_uri_storage_as_to_local_folders(tmp_path):
    from studies.runner.record import write_file

    write_file((tmp_path / "remote" / "study" / "trials.csv").as_uri(), "a,b\n1,2\n")  # file:// as s3:// would
    write_file(str(tmp_path / "local" / "study.json"), "{}")
    assert (tmp_path / "remote" / "study" / "trials.csv").read_text() == "a,b\n1,2\n"
    assert (tmp_path / "local" / "study.json").read_text() == "{}"
