"""Where a study's MLflow is: the URI as given resolved (relative sqlite paths made absolute), where a new
experiment's artifacts go on this machine, and a check, before Ray starts, that the store answers."""
from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from analysis.mlflow_store import BrokenStoreError, repair_leftovers, sqlite_path, store_lock


def resolve_uri(uri: str | None) -> str:
    """Default sqlite in the working directory; relative sqlite paths made absolute (trials run elsewhere)."""
    if not uri:
        return f"sqlite:///{os.path.abspath('mlflow.db')}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{os.path.abspath(uri[len('sqlite:///'):])}"
    return uri


def local_artifact_root(uri: str) -> Path | None:
    """Where a new experiment's artifacts go on this machine: beside a sqlite database (not in whatever the
    cwd is), or inside a file store; None for a tracking server, which stores them itself."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent / "mlartifacts"
    if uri.startswith("file:"):
        return Path(urllib.parse.urlparse(uri).path)
    if "://" not in uri and uri != "databricks":  # a bare folder is a file store too
        return Path(uri).expanduser().resolve()
    return None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail before any trial starts when an MLflow server does not answer, or a sqlite folder is missing."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as err:
            raise ConnectionError(f"--mlflow-uri {uri}: no MLflow server answers at {url} ({err}). Start one with "
                                  "'mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///ABS/mlflow.db'"
                                  " or pass a sqlite:/// URI.") from None
        raise ConnectionError(f"--mlflow-uri {uri}: {url} did not answer 200")
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise FileNotFoundError(f"--mlflow-uri {uri}: folder {folder} does not exist")
        path = sqlite_path(uri)
        with store_lock(path):  # a database broken by a creation race is repaired, or refused with the fix
            try:
                repair_leftovers(path)
            except BrokenStoreError as err:
                raise BrokenStoreError(f"--mlflow-uri {uri}: {err}") from None
