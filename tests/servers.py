"""Real servers on 127.0.0.1 for the tests: moto's S3-protocol server, PostgreSQL 15, an MLflow tracking server.

Each starts on a free port in a process group of its own, is waited for until it answers (its log in the
error when it does not), and when its block ends has only that group killed and its folder removed.

    with s3_server() as s3, postgres_server() as pg:
        s3.make_bucket("studies")
        with mlflow_server(pg.create_database("mlflow"), "s3://studies/mlflow", s3.env) as url:
            ...  # studies --storage s3://studies/vt --mlflow-uri {url}, with s3.env in their environment

Test modules import the module-scoped fixtures ``s3``, ``postgres`` and ``mlflow_on_postgres`` from here.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

BIN = Path(sys.executable).parent  # moto_server and mlflow are the venv's
PG_USER = "postgres"  # PostgreSQL refuses to run as root (CI runs as root): its processes run as this user
START_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.is_file() else "(no log)"


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace_s: float = 10) -> None:
    """``sig`` to the process group this module started, SIGKILL to whatever of it is left after ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):  # workers (uvicorn's) that outlived their leader
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def _process(cmd: list[str], what: str, ready: Callable[[], bool], log: Path, *, env: dict | None = None,
             cwd: Path | None = None, stop_signal: int = signal.SIGTERM) -> Iterator[float]:
    """Run ``cmd`` in a new process group until the block ends; yields the seconds it took to answer."""
    start = time.monotonic()
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                start_new_session=True)
    try:
        while not ready():
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with code {proc.returncode} before answering; {log}:\n{_tail(log)}")
            if time.monotonic() - start > START_TIMEOUT_S:
                raise RuntimeError(f"{what} did not answer in {START_TIMEOUT_S} s; {log}:\n{_tail(log)}")
            time.sleep(0.1)
        yield time.monotonic() - start
    finally:
        _stop(proc, stop_signal)


def _answers(url: str) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False
    return ready


@dataclass(frozen=True)
class S3:
    """moto's standalone S3 server: credentials are not checked, any non-empty pair works."""

    endpoint: str
    started_in_s: float = 0.0
    log: Path | None = None  # the server's request log, one line a request

    @property
    def env(self) -> dict[str, str]:
        """What boto3, pyarrow (Ray's storage) and MLflow's S3 artifact store need to reach this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):
        import boto3

        env = self.env
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=env["AWS_DEFAULT_REGION"],
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


@contextlib.contextmanager
def s3_server() -> Iterator[S3]:
    folder = Path(tempfile.mkdtemp(prefix="vt-s3-"))
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        with _process([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], "moto_server",
                      _answers(f"{endpoint}/"), folder / "log", cwd=folder) as seconds:
            yield S3(endpoint, seconds, folder / "log")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def postgres_bin() -> Path:
    """The folder of PostgreSQL's server binaries; fails (never skips) where they are missing."""
    found = shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    raise RuntimeError("PostgreSQL's initdb and postgres are neither on PATH nor under /usr/lib/postgresql/*/bin: "
                       "install PostgreSQL 15 (Debian: apt-get install postgresql-15) to run the PostgreSQL tests")


@dataclass(frozen=True)
class Postgres:
    port: int
    folder: Path
    started_in_s: float = 0.0

    def uri(self, database: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new database; returns its URI."""
        import psycopg

        with psycopg.connect(self.uri(), autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.uri(name)

    def query(self, database: str, sql: str, params: tuple = ()) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.uri(database)) as db:
            return db.execute(sql, params).fetchall()


def _as_postgres_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", PG_USER, "--", *cmd] if os.geteuid() == 0 else cmd


def _accepts(port: int, database: str = "postgres") -> Callable[[], bool]:
    def ready() -> bool:
        import psycopg

        try:
            psycopg.connect(f"postgresql://{PG_USER}@127.0.0.1:{port}/{database}", connect_timeout=2).close()
            return True
        except psycopg.OperationalError:  # not listening yet, or still starting up
            return False
    return ready


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres]:
    """A throw-away cluster (trust auth, no fsync) in a folder of /tmp owned by the user it runs as."""
    bin_dir = postgres_bin()
    folder = Path(tempfile.mkdtemp(prefix="vt-pg-"))  # not under pytest's tmp: that is root's, mode 0700
    if os.geteuid() == 0:
        shutil.chown(folder, PG_USER, PG_USER)
    port = free_port()
    try:
        start = time.monotonic()
        subprocess.run(_as_postgres_user([str(bin_dir / "initdb"), "-D", str(folder / "data"), "-U", PG_USER,
                                          "--auth=trust", "--no-sync", "--encoding=UTF8", "--locale=C"]),
                       check=True, capture_output=True, text=True)
        # the postmaster itself in the foreground (not pg_ctl, which detaches it): its group is ours to stop;
        # SIGINT is PostgreSQL's fast shutdown (SIGTERM waits for every client to leave)
        cmd = _as_postgres_user([str(bin_dir / "postgres"), "-D", str(folder / "data"), "-p", str(port),
                                 "-k", str(folder), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
        with _process(cmd, "postgres", _accepts(port), folder / "log", cwd=folder, stop_signal=signal.SIGINT):
            yield Postgres(port, folder, time.monotonic() - start)
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"initdb failed ({' '.join(err.cmd)}):\n{err.stdout}{err.stderr}") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class MLflowServer:
    url: str
    backend_uri: str
    artifacts: str
    started_in_s: float = 0.0


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: str, env: dict[str, str]) -> Iterator[MLflowServer]:
    """``mlflow server`` on ``backend_uri`` with its artifacts proxied to ``artifacts`` (s3://...), reached with
    ``env``'s S3 settings: clients log artifacts through the server and need none of them."""
    folder = Path(tempfile.mkdtemp(prefix="vt-mlflow-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # one worker and no job runner (7 huey consumers): 13 s to start on 2 cores, against 4 s
    env = {**os.environ, **env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", backend_uri, "--artifacts-destination", artifacts,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    try:
        with _process(cmd, "mlflow server", _answers(f"{url}/health"), folder / "log", env=env, cwd=folder) as seconds:
            yield MLflowServer(url, backend_uri, artifacts, seconds)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    try:
        postgres_bin()
    except RuntimeError as err:  # a failure, not a skip: CI must not pass without these tests
        pytest.fail(str(err), pytrace=False)
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="module")
def mlflow_on_postgres(s3: S3, postgres: Postgres) -> Iterator[MLflowServer]:
    """An MLflow server with its runs in PostgreSQL (database ``mlflow``) and artifacts in s3://mlflow-artifacts."""
    bucket = s3.make_bucket("mlflow-artifacts")
    with mlflow_server(postgres.create_database("mlflow"), f"s3://{bucket}/mlflow", s3.env) as server:
        yield server


@dataclass
class RayCluster:
    """A head and ``workers`` worker nodes of ``ray start --block``, each the leader of its own session."""

    address: str
    procs: list
    env: dict[str, str]


def _session_members(sid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


@contextlib.contextmanager
def ray_cluster(workers: int = 1, cpus: int = 1, env: dict[str, str] | None = None) -> Iterator[RayCluster]:
    """A local Ray cluster of separate nodes (``worker_node`` resources on the workers), stopped by session id:
    ``ray stop`` would stop every Ray on the machine."""
    import secrets

    folder = Path(tempfile.mkdtemp(prefix="vt-ray-"))  # short: Ray's socket paths must fit in 107 bytes
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **(env or {}),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    port = free_port()
    procs: list[subprocess.Popen] = []

    def node(name: str, args: list[str]) -> None:
        ports = [arg for flag in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                                  "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
                 for arg in (flag, str(free_port()))]
        log = folder / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", *args, "--num-cpus", str(cpus),
                                     "--num-gpus", "0", "--temp-dir", str(folder / name), *ports],
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        procs.append(proc)
        deadline = time.monotonic() + 150
        while "Ray runtime started." not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray node {name} did not start; {log}:\n{_tail(log)}")
            time.sleep(0.3)

    try:
        node("head", ["--head", "--port", str(port), "--include-dashboard=false", "--dashboard-port",
                      str(free_port())])
        for index in range(workers):
            node(f"worker{index}", ["--address", f"127.0.0.1:{port}", "--resources", '{"worker_node": 1}'])
        yield RayCluster(f"127.0.0.1:{port}", procs, env)
    finally:
        for proc in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
            for pid in _session_members(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(folder, ignore_errors=True)
