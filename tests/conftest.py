"""Shared fixtures: one embedded-data folder per test session, one real Ray runtime per module that asks."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """Embedded data sets (shapes scenes, caches) written once and shared by every test."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def ray_runtime():
    """A real Ray runtime (local mode no longer exists), with two logical GPUs so that per-trial GPU
    allocation can be checked on a CPU machine; trials that ask for no GPU still run on the CPU."""
    import ray

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}})
    yield ray
    ray.shutdown()


def study_command(script: str, *args: str) -> list[str]:
    """A study script run as a user would: ``python studies/NAME.py ...``."""
    return [sys.executable, str(ROOT / "studies" / f"{script}.py"), *args]


@pytest.fixture
def study_env(tmp_path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env["RAY_DEDUP_LOGS"] = "0"
    return env


# --quick, and still smaller where 2 cores need it: still embedded data, still 2 epochs
FAST = {"seg": ["--image-size", "32", "--steps-per-epoch", "2"], "cls": ["--steps-per-epoch", "2"],
        "vae": ["--steps-per-epoch", "5"]}
# what a shared run adds for the other tests that read it: test_tracking registers vae_lr's best model
SHARED_EXTRA = {"vae_lr": ["--register-model", "vae-lr-best"], "seg_search": ["--num-samples", "4"]}


def fast_flags(script: str) -> list[str]:
    return FAST[script.split("_")[0].replace("segnet", "seg")]


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory, data_root):
    """``python studies/NAME.py --quick ...`` run once per test session, as a user would (subprocess, real Ray,
    MLflow on sqlite), and shared by every test that reads that study's results: a study costs 30-60 s here.
    A user's MLFLOW_TRACKING_URI points elsewhere: --mlflow-uri alone must decide where the runs go."""
    import subprocess

    done: dict[str, dict] = {}

    def run(script: str) -> dict:
        if script not in done:
            base = tmp_path_factory.mktemp(script)
            uri = f"sqlite:///{base / 'mlflow.db'}"
            env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0",
                   "MLFLOW_TRACKING_URI": f"sqlite:///{base / 'elsewhere.db'}"}
            args = ["--quick", "--storage", str(base / "results"), "--mlflow-uri", uri, "--data-root", str(data_root),
                    *fast_flags(script), *SHARED_EXTRA.get(script, [])]
            proc = subprocess.run(study_command(script, *args), cwd=base, env=env, capture_output=True, text=True,
                                  timeout=600)
            done[script] = {"proc": proc, "base": base, "dir": base / "results" / script, "uri": uri, "env": env,
                            "args": args}
        return done[script]

    return run
