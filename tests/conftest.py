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
