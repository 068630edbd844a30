"""What the project takes from Ray and MLflow beyond their public APIs lives in two adapters,
``analysis/ray_internals.py`` and ``analysis/mlflow_internals.py``. Each test names the symbol it relies on, so an
upgrade that moves one fails here, saying which, instead of somewhere inside a study. The last test keeps the
rest of the code (tests and benchmarks included) free of underscore-prefixed Ray and MLflow names."""
from __future__ import annotations

import importlib
import inspect
import re
import signal

import pytest

from analysis import mlflow_internals, ray_internals
from conftest import ROOT

# (module, attribute) that the adapters import or call, as the upgrade that breaks them would see it
RAY_SYMBOLS = [("ray.experimental.internal_kv", "_internal_kv_get"), ("ray._private.state", "state"),
               ("ray._private.ray_constants", "DEBUG_AUTOSCALING_STATUS"),
               ("ray.autoscaler._private.util", "prepare_config"), ("ray.autoscaler._private.util", "validate_config"),
               ("ray.tune.tuner", "Tuner"), ("ray.tune.experiment", "Trial")]
MLFLOW_SYMBOLS = [("mlflow.store.db.utils", "_get_latest_schema_revision"),
                  ("mlflow.utils.environment", "warn_dependency_requirement_mismatches")]


@pytest.mark.parametrize("module,name", RAY_SYMBOLS + MLFLOW_SYMBOLS, ids=[f"{m}.{n}" for m, n in RAY_SYMBOLS + MLFLOW_SYMBOLS])
def test_each_symbol_the_adapters_use_still_exists(module, name):
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        pytest.fail(f"{module}.{name} is gone ({err}): update analysis/ray_internals.py or mlflow_internals.py")
    assert found is not None


def test_the_autoscaling_key_is_rays():
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS

    assert ray_internals.AUTOSCALING_STATUS_KEY == DEBUG_AUTOSCALING_STATUS


def test_tunes_stop_signal_and_sigint_switch_are_where_the_adapter_says():
    """Tune's fit() installs its stop handler on SIGUSR1 and reads TUNE_DISABLE_SIGINT_HANDLER."""
    from ray.tune.execution import tune_controller

    source = inspect.getsource(importlib.import_module("ray.tune.tune"))
    assert ray_internals.TUNE_STOP_SIGNAL == signal.SIGUSR1 and "SIGUSR1" in source
    assert ray_internals.TUNE_SIGINT_VARIABLE in source
    assert tune_controller is not None


def test_a_restored_tuner_exposes_its_run_config_and_trials_their_internals(tmp_path):
    """``_local_tuner.get_run_config()`` on a Tuner; ``max_failures``, ``placement_group_factory``, ``local_path``
    and ``storage`` on a Trial."""
    from ray import tune
    from ray.tune.experiment import Trial

    tuner = tune.Tuner(lambda config: None, run_config=tune.RunConfig(name="x", storage_path=str(tmp_path)))
    assert ray_internals.restored_run_config(tuner).name == "x"
    trial = Trial("x", config={}, stub=True, max_failures=0,
                  placement_group_factory=tune.PlacementGroupFactory([{"CPU": 1}]))
    trial.create_placement_group_factory()  # as Tune's add_trial does
    ray_internals.set_trial_retries(trial, 3)
    assert trial.max_failures == 3
    assert ray_internals.trial_resources(trial) == {"CPU": 1}
    assert hasattr(Trial, "local_path") and "storage" in vars(trial)


def test_a_snapshot_written_by_tune_parses(tmp_path):
    """The experiment snapshot's format (``trial_data`` entries with ``relative_logdir`` and ``status``), read
    from a study the runner wrote with today's Tune (tests/fixtures)."""
    folder = ROOT / "tests" / "fixtures" / "snapshot_2026_12" / "grid" / "vae_lr"
    [snapshot] = folder.glob(ray_internals.SNAPSHOT_GLOB)
    statuses = ray_internals.parse_snapshot(snapshot.read_text())
    assert len(statuses) == 5 and set(statuses.values()) == {"TERMINATED"}
    assert set(statuses) == {p.name for p in folder.iterdir() if p.is_dir()}


def test_optuna_search_saves_the_seed_counter_with_its_state(tmp_path):
    """OptunaSearch.save pickles the searcher's ``__dict__``: SeededOptunaSearch's counter survives a resume."""
    from ray import tune

    from studies.runner.tuner import SeededOptunaSearch

    searcher = SeededOptunaSearch(7, seed=7, metric="m", mode="min", space={"x": tune.uniform(0, 1)})
    seeds = [searcher.suggest(f"t{i}")["seed"] for i in range(3)]
    searcher.save(str(tmp_path / "state.pkl"))
    restored = SeededOptunaSearch(7, seed=7, metric="m", mode="min", space={"x": tune.uniform(0, 1)})
    restored.restore(str(tmp_path / "state.pkl"))
    assert restored.suggest("t3")["seed"] not in seeds and restored._suggested == 4


def test_mlflows_schema_revision_and_requirements_check():
    assert re.fullmatch(r"[0-9a-f]{12}", mlflow_internals.latest_schema_revision())
    from mlflow.utils import environment

    check = environment.warn_dependency_requirement_mismatches
    with mlflow_internals.requirements_check_skipped():
        assert environment.warn_dependency_requirement_mismatches is not check
    assert environment.warn_dependency_requirement_mismatches is check


PRIVATE = re.compile(r"\b(?:ray|mlflow)(?:\.\w+)*\._(?!_)\w+|from (?:ray|mlflow)[\w.]* import [^\n]*\b_[a-z]\w*|"
                     r"\._local_tuner\b")
ADAPTERS = {"analysis/ray_internals.py", "analysis/mlflow_internals.py", "tests/test_internals.py"}


def test_no_private_ray_or_mlflow_name_outside_the_adapters():
    offenders = []
    for folder in ("studies", "trainables", "analysis", "vision_models", "benchmarks", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = str(path.relative_to(ROOT))
            if relative in ADAPTERS or "fixtures" in path.parts:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if PRIVATE.search(code) and not code.strip().startswith(('"', "'")):
                    offenders.append(f"{relative}:{number}: {line.strip()}")
    assert not offenders, "private Ray/MLflow names outside the adapters:\n" + "\n".join(offenders)
