"""Shared fixtures: one embedded-data folder per test session, one real Ray runtime per module that asks."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what every epoch of a trial reports, per kind of task
LABEL_KEYS = {"train/loss", "val/loss", "val/accuracy", "val/precision", "val/recall", "val/miou", "epoch",
              "images_per_s"}
VAE_KEYS = {"train/loss", "val/loss", "val/recon", "val/kl", "val/elbo", "epoch", "images_per_s"}


# `make test` runs two pytest workers (pytest-xdist): the serial suite left the 2 cores idle a third of the time,
# waiting on Ray nodes, servers and signals. Each module's tests stay on one worker, so module fixtures (a two-node
# cluster, a job-submit head) start once; the modules that read the session's shared --quick runs (quick_run) share
# a worker, so each of those studies still runs once. Longest groups first (serial seconds measured on 2 cores),
# so that no long module starts last.
SHARED_RUN_MODULES = {"test_analysis", "test_studies", "test_tracking"}
GROUP_SECONDS = {"shared_runs": 430, "test_benchmarks": 330, "test_s3": 260, "test_reliability": 130,
                 "test_cluster_isolated": 130, "test_interrupts": 110, "test_tracking_outage": 100,
                 "test_autoscaler": 85, "test_job_submit": 75, "test_trainables": 70, "test_cluster": 65,
                 "test_findings": 60, "test_gpu_paths": 45, "test_models": 60, "test_cli": 40}


def module_group(nodeid: str) -> str:
    module = Path(nodeid.split("::")[0]).stem
    return "shared_runs" if module in SHARED_RUN_MODULES else module


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, absent where it is not installed
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ModuleGroups(LoadScopeScheduling):
        ordered = False

        def _split_scope(self, nodeid: str) -> str:
            return module_group(nodeid)

        def _assign_work_unit(self, node) -> None:
            if not self.ordered:  # the queue is complete by the first assignment
                queue = sorted(self.workqueue.items(), key=lambda unit: -GROUP_SECONDS.get(unit[0], 0))
                self.workqueue.clear()
                self.workqueue.update(queue)
                self.ordered = True
            super()._assign_work_unit(node)

    return ModuleGroups(config, log)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """Embedded data sets (shapes scenes, caches) written once and shared by every test."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def ray_runtime():
    """A real Ray runtime (local mode no longer exists), with two logical GPUs so that per-trial GPU
    allocation can be checked on a CPU machine; trials that ask for no GPU still run on the CPU."""
    import signal

    import ray

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}})
    yield ray
    ray.shutdown()
    for sig, handler in handlers.items():  # ray.init's own SIGTERM handler outlives shutdown(): the next module's
        signal.signal(sig, handler)       # tests find the process as they would alone


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
FAST = {"seg": ["--image-size", "32", "--steps-per-epoch", "2"], "cls": ["--steps-per-epoch", "2", "--batch-size", "8"],
        "vae": ["--steps-per-epoch", "5"]}
# what a shared run adds for the other tests that read it: test_tracking registers vae_lr's best model
SHARED_EXTRA = {"vae_lr": ["--register-model", "vae-lr-best"], "seg_search": ["--num-samples", "4"]}


def fast_flags(script: str) -> list[str]:
    return FAST[script.split("_")[0].replace("segnet", "seg")]


def run_in_process(target: str, args: list[str], cwd: Path, env: dict[str, str]):
    """``python TARGET ARGS`` (a script's path, or ``-m module``) run inside this process, as its ``__main__``,
    with ``cwd`` and ``env`` as the command would have them: the exit code and output of a subprocess without
    its ~10 s of imports and interpreter exit. Use it where a test reads a run's results; a test of the command
    line itself (exit codes, signals, a killed driver) runs a real subprocess."""
    import contextlib
    import io
    import runpy
    import subprocess

    out, err, code = io.StringIO(), io.StringIO(), 0
    module = target[3:] if target.startswith("-m ") else None
    saved_argv, saved_cwd, saved_env = sys.argv, os.getcwd(), dict(os.environ)
    sys.argv = [target if module is None else module, *args]
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if module is None:
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if not isinstance(exit_.code, (int, type(None))):
            print(exit_.code, file=err)
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess([sys.executable, target, *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory, data_root):
    """``python studies/NAME.py --quick ...`` run once per test session (real Ray started and stopped by the
    study, MLflow on sqlite) and shared by every test that reads that study's results: a study costs 30-60 s
    here. In this process (``run_in_process``); the command line's own behaviour is tested by subprocesses.
    A user's MLFLOW_TRACKING_URI points elsewhere: --mlflow-uri alone must decide where the runs go."""
    done: dict[str, dict] = {}

    def run(script: str) -> dict:
        if script not in done:
            base = tmp_path_factory.mktemp(script)
            uri = f"sqlite:///{base / 'mlflow.db'}"
            env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0",
                   "MLFLOW_TRACKING_URI": f"sqlite:///{base / 'elsewhere.db'}"}
            args = ["--quick", "--storage", str(base / "results"), "--mlflow-uri", uri, "--data-root", str(data_root),
                    *fast_flags(script), *SHARED_EXTRA.get(script, [])]
            proc = run_in_process(str(ROOT / "studies" / f"{script}.py"), args, base, env)
            done[script] = {"proc": proc, "base": base, "dir": base / "results" / script, "uri": uri, "env": env,
                            "args": args}
        return done[script]

    return run
