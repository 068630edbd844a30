"""Opening an MLflow store safely, and the UI address of a study's runs (shared by the runner and analysis).

Two processes that open the same new sqlite file at once both run MLflow's schema migrations; they fail
and can leave ``_alembic_tmp_*`` tables behind, after which every client fails. So the first open of a
sqlite store (which creates or upgrades its tables) runs under an exclusive ``fcntl`` lock on a file
beside the database, and a database that such a race already broke is repaired when that is safe (it
holds no runs, or its schema is complete and only the leftover copies remain) or refused with the fix.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import sqlite3
import threading
import urllib.parse
from pathlib import Path

log = logging.getLogger(__name__)
UI_HOST, UI_PORT = "127.0.0.1", 5000
PARENT_TAG = "vision_tune.study_run"  # "true" on the one run per study that its trials' runs nest under
STUDY_TAG = "vision_tune.study"
STUDY_DIR_TAG = "vision_tune.study_dir"  # one parent per study folder: a study name run in two --storage is two
_LEFTOVER = "_alembic_tmp_"
_parent_lock = threading.Lock()


class BrokenStoreError(RuntimeError):
    """A sqlite MLflow database left half-migrated, which MLflow cannot open and we cannot repair safely."""


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///ABS`` URI; None for other stores."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def store_lock(path: Path):
    """An exclusive lock on ``PATH.lock`` for as long as the block runs (every process of any study)."""
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_client(uri: str):
    """An ``MlflowClient`` whose store exists: a sqlite store is created or upgraded under the lock."""
    from mlflow.tracking import MlflowClient

    # the registry pinned to the same store: by default it follows the process's global tracking URI (a user's
    # MLFLOW_TRACKING_URI), and registering a model logged here would look for it in that other store
    path = sqlite_path(uri)
    if path is None:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    with store_lock(path):
        repair_leftovers(path)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # opens the tracking store: creates or upgrades
        client.search_registered_models(max_results=1)  # the registry store checks the same file
    return client


def experiment_id(client, uri: str, name: str) -> str:
    """The experiment ``name``, created when missing; beside a sqlite database its artifacts go into
    ``mlartifacts/<name>`` next to the file (not into whatever folder the process runs in)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    path = sqlite_path(uri)
    location = (path.parent / "mlartifacts" / name).as_uri() if path else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another study of this name created it since (names are unique)
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def find_or_create_parent(client, experiment: str, study: str, study_dir: str, params: dict[str, str] | None = None,
                          *, any_folder: bool = False) -> str:
    """The parent run of the study in ``study_dir`` (found by tags; the oldest if several), created when missing.
    ``any_folder``: else the experiment's only parent (a report built from a copied study folder)."""
    from mlflow.entities import Param

    def search(extra: str) -> list:
        return client.search_runs([experiment], f"tags.`{PARENT_TAG}` = 'true'{extra}", max_results=2,
                                  order_by=["attributes.start_time ASC"])

    with _parent_lock:  # atomic within this process; a study runs from one driver at a time
        found = search(f" AND tags.`{STUDY_DIR_TAG}` = '{study_dir}'")
        if not found and any_folder and len(others := search("")) == 1:
            found = others
        if found:
            return found[0].info.run_id
        tags = {PARENT_TAG: "true", STUDY_TAG: study, STUDY_DIR_TAG: study_dir}
        run_id = client.create_run(experiment, run_name=study, tags=tags).info.run_id
        if params:
            client.log_batch(run_id, params=[Param(key, value) for key, value in params.items()])
        return run_id


def _tables(db: sqlite3.Connection) -> set[str]:
    return {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _count(db: sqlite3.Connection, tables: set[str], table: str, where: str = "") -> int:
    return db.execute(f"SELECT COUNT(*) FROM {table} {where}").fetchone()[0] if table in tables else 0


def repair_leftovers(path: Path) -> None:
    """Repair or refuse a database with ``_alembic_tmp_*`` tables; call under ``store_lock``."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with contextlib.closing(sqlite3.connect(path)) as db:
        tables = _tables(db)
        leftovers = sorted(t for t in tables if t.startswith(_LEFTOVER))
        if not leftovers:
            return
        runs = _count(db, tables, "runs")
        kept = runs + _count(db, tables, "registered_models") + _count(db, tables, "experiments",
                                                                        "WHERE experiment_id != 0")
        revision = db.execute("SELECT version_num FROM alembic_version").fetchone() if "alembic_version" in tables \
            else None
        from analysis.mlflow_internals import latest_schema_revision

        head = latest_schema_revision()
        complete = revision is not None and revision[0] == head and all(t[len(_LEFTOVER):] in tables
                                                                       for t in leftovers)
        if kept == 0 or complete:
            if kept == 0:  # nothing to lose: start the database again
                db.close()
                for extra in ("", "-journal", "-wal", "-shm"):
                    Path(f"{path}{extra}").unlink(missing_ok=True)
            else:  # the schema is whole; the tables left over are copies of a migration another process finished
                for table in leftovers:
                    db.execute(f'DROP TABLE "{table}"')
                db.commit()
            log.warning("MLflow database %s had tables %s left by processes that created it at the same time: %s",
                        path, ", ".join(leftovers), "recreated it (it held no runs)" if kept == 0
                        else "dropped them (its schema is complete)")
            return
    drops = "; ".join(f"DROP TABLE {t}" for t in leftovers)
    raise BrokenStoreError(
        f"MLflow database {path} was left half-migrated (tables {', '.join(leftovers)}; schema revision "
        f"{revision[0] if revision else 'none'}, MLflow expects {head}) by processes that created or upgraded it at "
        f"the same time, and it holds {runs} run(s), so it is not reused. Fix: stop every process using it, keep a "
        f"copy (cp {path} {path}.bak), then run: sqlite3 {path} '{drops}' && mlflow db upgrade sqlite:///{path} "
        f"(if the upgrade fails, restore the copy you had before the upgrade, or pass another --mlflow-uri)")


def ui_command(uri: str) -> str | None:
    """The command that serves the UI for a sqlite store (None: the URI is a tracking server already)."""
    if uri.startswith(("http://", "https://")):
        return None
    return f"mlflow ui --host {UI_HOST} --port {UI_PORT} --backend-store-uri {uri}"


def runs_url(uri: str, experiment_id: str) -> str:
    """The experiment's runs in the UI's model-training view: MLflow 3 otherwise opens its (empty) GenAI
    overview of traces, and the trials show only after switching the toggle to "Model training"."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else f"http://{UI_HOST}:{UI_PORT}"
    return f"{base}/#/experiments/{urllib.parse.quote(str(experiment_id))}/runs?workflowType=machine_learning"
