"""Results in S3 and MLflow on PostgreSQL with S3 artifacts, against real servers this module starts on 127.0.0.1
(``tests/servers.py``: moto's S3 server, PostgreSQL 15, ``mlflow server``); one of each for the whole module."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from analysis.remote import fetch_study
from analysis.tables import short_id
from conftest import ROOT, run_in_process, study_command
from servers import free_port, mlflow_on_postgres, postgres, s3  # noqa: F401 (module-scoped fixtures)
from studies.runner.storage import StorageError, check_storage, remove_study

# --quick and smaller still: vae_lr's 5 learning rates, one epoch of 2 batches each (~30 s on 2 cores)
QUICK = ["--quick", "--epochs", "1", "--steps-per-epoch", "2", "--num-samples", "1"]
STUDY_URI = "s3://studies/vt/vae_lr"


@pytest.fixture
def s3_env(s3, monkeypatch, tmp_path):
    """This process pointed at the module's S3 server, and away from any ~/.aws of the machine's."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3


def study_env(s3) -> dict[str, str]:
    # a local Ray started by the driver passes the driver's environment, S3 settings included, to its trials
    return {**os.environ, **s3.env, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}


def run_study(args: list[str], env: dict, cwd) -> subprocess.CompletedProcess:
    proc = subprocess.run(study_command("vae_lr", *QUICK, *args), env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def one_line_error(call) -> str:
    start = time.monotonic()
    with pytest.raises(StorageError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and message.startswith("--storage ")
    assert time.monotonic() - start < 15, "the check must fail in seconds, not after long retries"
    return message


def test_check_storage_accepts_a_bucket_that_exists(s3_env):
    s3_env.make_bucket("present")
    check_storage("s3://present/vt")
    check_storage("results")  # a local folder: the disk pre-flight's business


def test_check_storage_names_a_missing_bucket(s3_env):
    message = one_line_error(lambda: check_storage("s3://absent/vt"))
    assert "bucket absent does not exist" in message and s3_env.endpoint in message


def test_check_storage_names_an_unreachable_endpoint(s3_env, monkeypatch):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    message = one_line_error(lambda: check_storage("s3://present/vt"))
    assert "cannot reach the S3 endpoint" in message and closed in message and "AWS_ENDPOINT_URL" in message


def test_check_storage_names_missing_credentials(s3_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    message = one_line_error(lambda: check_storage("s3://present/vt"))
    assert "no AWS credentials" in message and "present" in message and "AWS_ACCESS_KEY_ID" in message


def test_remove_study_removes_its_prefix_only(s3_env, tmp_path):
    bucket = s3_env.make_bucket("removal")
    client = s3_env.client()
    # more than one listing page (1,000 keys): a real study holds ~40 objects a trial
    study = [f"vt/vae_lr/train_{i:04d}/result.json" for i in range(1005)] + ["vt/vae_lr/", "vt/vae_lr/study.json"]
    kept = ["vt/vae_lr_old/study.json", "vt/other/study.json", "vt/vae_lr.txt"]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=bucket, Key=key, Body=b"{}"), study + kept))
    remove_study(f"s3://{bucket}/vt/vae_lr")
    assert s3_env.keys(bucket) == sorted(kept)
    with pytest.raises(StorageError, match="whole bucket"):
        remove_study(f"s3://{bucket}")
    (tmp_path / "local" / "t").mkdir(parents=True)
    remove_study(str(tmp_path / "local"))
    assert not (tmp_path / "local").exists()


@pytest.fixture(scope="module")
def study_on_s3(s3, tmp_path_factory) -> dict:
    """``vae_lr --quick --storage s3://studies/vt`` (MLflow on sqlite), run once for the module."""
    s3.make_bucket("studies")
    base = tmp_path_factory.mktemp("s3_study")
    start = time.monotonic()
    proc = run_study(["--storage", "s3://studies/vt", "--mlflow-uri", f"sqlite:///{base / 'mlflow.db'}"],
                     study_env(s3), base)
    return {"proc": proc, "base": base, "seconds": time.monotonic() - start}


@pytest.mark.slow
def test_study_writes_its_results_and_checkpoints_to_the_bucket(s3, study_on_s3):
    keys = s3.keys("studies", "vt/vae_lr/")
    assert {"vt/vae_lr/study.json", "vt/vae_lr/trials.csv", "vt/vae_lr/finding.json"} <= set(keys)
    trials = {key.split("/")[2] for key in keys if key.endswith("/result.json")}
    assert len(trials) == 5
    for trial in trials:
        assert f"vt/vae_lr/{trial}/checkpoint_000000/state.pt" in keys
        result = json.loads(s3.client().get_object(Bucket="studies", Key=f"vt/vae_lr/{trial}/result.json")["Body"]
                            .read().decode().splitlines()[-1])
        assert result["epoch"] == 1 and "val/loss" in result
    assert not (study_on_s3["base"] / "results").exists()  # nothing landed in the default local folder


@pytest.mark.slow
def test_analysis_builds_the_report_from_the_bucket(s3, study_on_s3, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "analysis", STUDY_URI, "--out", str(out)], env=study_env(s3),
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"report: {out / 'index.html'}" in proc.stdout
    page = (out / "index.html").read_text()
    trials = {key.split("/")[2] for key in s3.keys("studies", "vt/vae_lr/") if key.endswith("/result.json")}
    assert trials and all(f"<td>{short_id(trial)}</td>" in page for trial in trials)  # a row per trial
    assert STUDY_URI in page  # the study named by its URI, not by the temporary copy it was read from
    assert list(out.glob("*.png")), "no figure: the last checkpoints' artifacts were not read"


@pytest.mark.slow
def test_analysis_copies_records_and_last_artifacts_not_weights(s3_env, study_on_s3, tmp_path):
    copy = fetch_study(STUDY_URI, tmp_path / "copy")
    files = {path.relative_to(copy).as_posix() for path in copy.rglob("*") if path.is_file()}
    assert {"study.json", "trials.csv", "finding.json"} <= files
    trials = {name.split("/")[0] for name in files if name.endswith("/params.json")}
    assert len(trials) == 5
    for trial in trials:
        assert {f"{trial}/result.json", f"{trial}/checkpoint_000000/artifacts/meta.json"} <= files
    assert not [name for name in files if name.endswith((".pt", ".pth")) or "/model/" in name]


@pytest.mark.slow
def test_analysis_of_a_uri_writes_to_report_name_and_names_a_missing_study(s3_env, study_on_s3, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = run_in_process("-m analysis", [STUDY_URI, "--no-mlflow"], tmp_path, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "report" / "vae_lr" / "index.html").is_file()
    proc = run_in_process("-m analysis", ["s3://studies/vt/absent"], tmp_path, env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: s3://studies/vt/absent is not a study folder: study.json is missing "
                                   "(expected <storage>/<study name> as written by 'python studies/NAME.py "
                                   "--storage <storage>')")


@pytest.mark.slow
def test_mlflow_on_postgres_with_artifacts_in_s3(s3, postgres, mlflow_on_postgres, tmp_path):
    s3.make_bucket("pg-studies")
    run_study(["--storage", "s3://pg-studies/vt", "--mlflow-uri", mlflow_on_postgres.url,
               "--register-model", "vae-lr-best"], study_env(s3), tmp_path)
    # straight from PostgreSQL: the server stored there, not in a file of its own
    (experiment,), = postgres.query("mlflow", "SELECT experiment_id FROM experiments WHERE name = 'vae_lr'")
    runs = dict(postgres.query("mlflow", "SELECT run_uuid, status FROM runs WHERE experiment_id = %s", (experiment,)))
    parents = dict(postgres.query(
        "mlflow", "SELECT run_uuid, value FROM tags WHERE key = 'mlflow.parentRunId' AND run_uuid = ANY(%s)",
        (list(runs),)))
    (parent,) = set(runs) - set(parents)
    assert len(parents) == 5 and set(parents.values()) == {parent}
    assert set(runs.values()) == {"FINISHED"}
    logged = dict(postgres.query("mlflow", "SELECT run_uuid, COUNT(*) FROM metrics WHERE key = 'val/loss' "
                                 "AND run_uuid = ANY(%s) GROUP BY run_uuid", (list(parents),)))
    assert set(logged) == set(parents)
    assert postgres.query("mlflow", "SELECT name FROM registered_models") == [("vae-lr-best",)]
    # artifacts went through the server (mlflow-artifacts:/...) into the bucket: every trial's files, every
    # logged model (the registered one among them)
    keys = set(s3.keys("mlflow-artifacts", "mlflow/"))
    for run in parents:
        assert any(key.startswith(f"mlflow/{experiment}/{run}/artifacts/") for key in keys), run
    models = postgres.query("mlflow", "SELECT artifact_location FROM logged_models WHERE experiment_id = %s",
                            (experiment,))
    assert len(models) >= 1
    for (location,) in models:
        assert location.startswith("mlflow-artifacts:/")
        assert f"mlflow/{location[len('mlflow-artifacts:/'):].strip('/')}/MLmodel" in keys


def _bucket_epochs(s3, bucket: str, prefix: str) -> dict[str, list[int]]:
    """Trial folder -> the epochs of its result.json in the bucket."""
    found = {}
    for key in s3.keys(bucket, prefix):
        if key.endswith("/result.json"):
            body = s3.client().get_object(Bucket=bucket, Key=key)["Body"].read().decode()
            found[key.split("/")[-2]] = [json.loads(line)["epoch"] for line in body.splitlines() if line.strip()]
    return found


@pytest.mark.slow
def test_a_killed_driver_resumes_from_the_bucket_and_overwrite_clears_it(s3, postgres, tmp_path):
    """The driver SIGKILLed mid-study (its Ray with it), then --resume: every trial ends with each epoch once in
    the bucket and in MLflow (on PostgreSQL, through a URI whose password never shows); --overwrite then removes
    the old study's objects."""
    import signal

    s3.make_bucket("resumable")
    secret_uri = postgres.create_database("resumable").replace("postgresql://postgres@",
                                                               "postgresql://postgres:Sh0uldNotLeak@")
    args = ["--quick", "--epochs", "3", "--steps-per-epoch", "10", "--max-concurrent", "1", "--checkpoint-every", "1",
            "--storage", "s3://resumable/vt", "--mlflow-uri", secret_uri]
    env = study_env(s3)
    driver = subprocess.Popen(study_command("vae_lr", *args), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:
        epochs = _bucket_epochs(s3, "resumable", "vt/vae_lr/")
        if sum(len(e) for e in epochs.values()) >= 4 and any(len(e) < 3 for e in epochs.values()):
            break
        time.sleep(0.5)
    assert driver.poll() is None, "the study ended before it could be killed"
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started die at once
    driver.wait()
    record = json.loads(s3.client().get_object(Bucket="resumable", Key="vt/vae_lr/study.json")["Body"].read())
    assert "Sh0uldNotLeak" not in json.dumps(record) and "postgres:***@" in record["mlflow_uri"]

    resume = [a for a in args if a not in ("--mlflow-uri", secret_uri)] + ["--resume"]
    refused = subprocess.run(study_command("vae_lr", *resume), env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and "recorded without its password: pass --mlflow-uri" in refused.stderr
    done = subprocess.run(study_command("vae_lr", *resume, "--mlflow-uri", secret_uri), env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Sh0uldNotLeak" not in done.stdout + done.stderr and "postgres:***@" in done.stdout
    epochs = _bucket_epochs(s3, "resumable", "vt/vae_lr/")
    assert len(epochs) == 5 and all(sorted(set(e)) == [1, 2, 3] for e in epochs.values()), epochs
    runs = postgres.query("resumable", "SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                          "WHERE t.key = 'vision_tune.trial_id'")
    assert len(runs) == 5  # one run per trial, the resumed ones continued
    for (run,) in runs:
        steps = [step for (step,) in postgres.query("resumable", "SELECT step FROM metrics WHERE run_uuid = %s AND "
                                                    "key = 'val/loss' ORDER BY step", (run,))]
        assert steps == [1, 2, 3], (run, steps)
    params = postgres.query("resumable", "SELECT value FROM params WHERE key = 'argv'")
    assert params and not any("Sh0uldNotLeak" in value for (value,) in params)

    again = subprocess.run(study_command("vae_lr", *QUICK, "--storage", "s3://resumable/vt", "--overwrite",
                                         "--mlflow-uri", f"sqlite:///{tmp_path / 'other.db'}"),
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    epochs = _bucket_epochs(s3, "resumable", "vt/vae_lr/")
    assert len(epochs) == 5 and all(e == [1] for e in epochs.values()), epochs  # the old trials are gone


@pytest.mark.slow
def test_two_studies_started_at_once_on_one_server_both_land(s3, postgres, mlflow_on_postgres, tmp_path):
    """Two studies against one MLflow server on PostgreSQL at the same moment: both finish, every trial's run holds
    its epochs, and each prints the URL of its own experiment's runs, which the server knows."""
    import urllib.request

    s3.make_bucket("together")
    env = study_env(s3)
    since = int(time.time() * 1000)  # the module's other tests logged vae_lr to this server too
    commands = [study_command(script, *QUICK, "--storage", "s3://together/vt", "--mlflow-uri", mlflow_on_postgres.url)
                for script in ("vae_lr", "vae_losses")]
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda cmd: subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                                                        timeout=600), commands))
    for proc in done:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name, proc, trials in (("vae_lr", done[0], 5), ("vae_losses", done[1], 3)):
        (experiment,), = postgres.query("mlflow", "SELECT experiment_id FROM experiments WHERE name = %s", (name,))
        runs = postgres.query("mlflow", "SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid WHERE "
                              "r.experiment_id = %s AND t.key = 'vision_tune.trial_id' AND r.start_time >= %s",
                              (experiment, since))
        assert len(runs) == trials, name
        for (run,) in runs:
            assert postgres.query("mlflow", "SELECT step FROM metrics WHERE run_uuid = %s AND key = 'val/loss'",
                                  (run,)) == [(1,)], (name, run)
        url = f"{mlflow_on_postgres.url}/#/experiments/{experiment}/runs?workflowType=machine_learning"
        assert f"MLflow UI: {url}" in proc.stdout, proc.stdout[-2000:]
        api = f"{mlflow_on_postgres.url}/ajax-api/2.0/mlflow/experiments/get?experiment_id={experiment}"
        with urllib.request.urlopen(api, timeout=30) as response:
            assert json.loads(response.read())["experiment"]["name"] == name
