"""Everything vision-tune takes from MLflow that MLflow does not promise to keep, one function each, so that an
upgrade breaks here and ``tests/test_internals.py`` names the symbol that moved (README, "What we rely on")."""
from __future__ import annotations

import contextlib
from typing import Iterator


def latest_schema_revision() -> str:
    """The alembic revision MLflow's SQL store expects (a half-migrated sqlite file is judged against it)."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


@contextlib.contextmanager
def requirements_check_skipped() -> Iterator[None]:
    """Skip MLflow's check, in ``save_model``, that a model's pinned requirements are installed. It maps every
    installed distribution to its modules first (``importlib.metadata.packages_distributions``): 3.1 s per
    process here. Our pins are the running modules' own versions, so it cannot find a mismatch. MLflow has no
    switch for it (``MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK`` skips another check); if the function moves, the
    check simply runs (and the adapter's test says so)."""
    from mlflow.utils import environment

    name = "warn_dependency_requirement_mismatches"
    check = getattr(environment, name, None)
    if check is None:
        yield
        return
    setattr(environment, name, lambda requirements: None)
    try:
        yield
    finally:
        setattr(environment, name, check)
