"""MLflow stores for tests: a real `mlflow server` on 127.0.0.1 (sqlite or PostgreSQL behind it)
and a throwaway PostgreSQL cluster from Debian's packages, installed when absent."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts_dir: str | Path, log_file: Path, *, extra_args: tuple[str, ...] = (),
                  extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """`mlflow server` with proxied artifacts (what a team runs), yielding its URL once healthy.
    `artifacts_dir` is a folder or an object-store URI (s3://...)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    env.update(extra_env or {})
    with log_file.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
                                 "--artifacts-destination", str(artifacts_dir), "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "1", *extra_args], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ok(f"{url}/health", proc, log_file, "mlflow server")
        yield url
    finally:
        terminate(proc)


def wait_until_ok(url: str, proc: subprocess.Popen, log_file: Path, what: str, timeout: float = 120) -> None:
    """Until `url` answers 200; RuntimeError with the log's tail if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not become healthy:\n{log_file.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)


def terminate(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


def install_postgres() -> str:
    """Install Debian's postgresql; returns why not when it cannot."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "not root or no apt-get, so Debian's postgresql cannot be installed here"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "postgresql"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            return f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}"
    return ""


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL cluster on a free port; yields a SQLAlchemy URI for MLflow."""
    try:
        import psycopg2  # noqa: F401  (MLflow's PostgreSQL driver)
    except ImportError:
        pytest.skip("psycopg2 is not installed (it comes with the test extra: pip install -e .[test])")
    bindir = postgres_bin()
    if bindir is None:
        reason = install_postgres()
        bindir = postgres_bin()
        if bindir is None:
            pytest.skip(f"PostgreSQL is not installed and could not be installed: {reason}")
    # initdb refuses to run as root: as root, the cluster belongs to Debian's `postgres` user, in a
    # directory that user can reach (pytest's tmp dirs are private to root).
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data = Path(tempfile.mkdtemp(prefix="kiln-pg-"))
    if as_user:
        shutil.chown(data, "postgres", "postgres")
    port = free_port()

    def pg(*args: str) -> None:
        proc = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")

    try:
        pg(str(bindir / "initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "postgres")
        pg(str(bindir / "pg_ctl"), "-D", str(data / "db"), "-l", str(data / "server.log"), "-w", "start",
           "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1")
        try:
            yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"  # SQLAlchemy 2.1 defaults to psycopg 3
        finally:
            pg(str(bindir / "pg_ctl"), "-D", str(data / "db"), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(data, ignore_errors=True)
