"""Start NVIDIA Triton Inference Server on a model repository, wait until it serves, stop it cleanly.

The server keeps running when a model fails to load (`--exit-on-error=false`) and reports
not-ready, so a refused (tampered) repository shows as a not-ready model with its log line rather
than a vanished process. Triton ignores SIGINT when started in the background: it is stopped
with SIGTERM, and waited for.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.artifacts import link_tree
from pipeline.errors import KilnError
from pipeline.serving.environment import ServingEnvironment

EXIT_TIMEOUT_S = 5
DRAIN_VARIABLE = "KILN_DRAIN_FILE"  # read by the Triton model (serving/triton_model.py)


class ServerNotReady(KilnError):
    exit_code = 9


class ServerDied(KilnError):
    """tritonserver exited while serving (a crash, a kill, the OOM killer): `kiln serve` exits
    non-zero so a supervisor (systemd, Kubernetes) restarts it."""

    exit_code = 12


@dataclass(frozen=True)
class Addresses:
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    http_host: str | None = None  # where HTTP listens when not on `host`
    metrics_host: str | None = None  # where metrics listen when not on `host`

    @property
    def http(self) -> str:
        return f"http://{self.http_host or self.host}:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics(self) -> str:
        return f"http://{self.metrics_host or self.host}:{self.metrics_port}/metrics"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(count: int, avoid=()) -> list[int]:
    """`count` distinct free ports, none of them in `avoid`: a port is free again once `free_port`
    closes its socket, so separate calls can return the same one (seen: Triton refused gRPC and
    metrics on one port)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports and port not in avoid:
            ports.append(port)
    return ports


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def exit_description(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit {returncode}"


def log_tail(log_file: Path, lines: int = 15) -> str:
    return "\n".join(log_file.read_text(errors="replace").splitlines()[-lines:]) if log_file.is_file() else ""


@contextlib.contextmanager
def triton_server(repository: Path | None, env: ServingEnvironment, log_file: Path, *, host: str = "127.0.0.1",
                  ports: tuple[int, int, int] | None = None, wait_ready: bool = True, timeout: float = 120,
                  version: str | None = None, http_host: str | None = None, metrics_host: str | None = None,
                  otlp_endpoint: str | None = None) -> Iterator[tuple[subprocess.Popen, Addresses]]:
    """`version`: serve each model as this version (the registry version) instead of the package's "1".
    `http_host`: HTTP's interface when not `host` (`kiln serve` keeps it on loopback, behind its guard).
    `metrics_host`: the metrics' interface when not `host` (with API keys, inference stays on
    loopback while Prometheus still scrapes the metrics). `otlp_endpoint`: OpenTelemetry traces of
    every request from tritonserver and from the model (tracing.py), to that OTLP/HTTP collector.
    `repository` None: an empty repository under explicit model control, which the caller fills and
    loads through Triton's repository API (fleet.py; `served_repository(proc)` is its folder)."""
    # Triton's Python backend writes __pycache__ beside model.py whatever the environment says
    # (measured), so the server runs on a hard-linked snapshot: the repository itself stays exactly
    # what its manifest lists.
    snapshot = Path(tempfile.mkdtemp(prefix="kiln-triton-")) / "model_repository"
    if repository is None:
        snapshot.mkdir()
    else:
        link_tree(repository, snapshot)
    drain = drain_file(snapshot)
    if version is not None and version != "1":
        for model_dir in snapshot.iterdir():
            if (model_dir / "1").is_dir():
                (model_dir / "1").rename(model_dir / version)
    http_port, grpc_port, metrics_port = ports or free_ports(3)
    addresses = Addresses(host, http_port, grpc_port, metrics_port, http_host, metrics_host)
    cmd = [str(env.tritonserver), f"--model-repository={snapshot}", f"--backend-directory={env.backends}",
           f"--http-address={http_host or host}", f"--http-port={http_port}", f"--grpc-address={host}", f"--grpc-port={grpc_port}",
           f"--metrics-address={metrics_host or host}", f"--metrics-port={metrics_port}", "--exit-on-error=false", "--log-verbose=0",
           # at SIGTERM tritonserver waits this long for in-flight requests (default 30 s); the model
           # ends its own at unload, and `kiln serve` has already closed its clients' connections
           f"--exit-timeout-secs={EXIT_TIMEOUT_S}"] + (["--model-control-mode=explicit"] if repository is None else [])
    tracing_env = {}
    if otlp_endpoint:
        from pipeline.serving.tracing import triton_trace_options

        cmd += triton_trace_options(otlp_endpoint)
        tracing_env = {"KILN_OTLP_ENDPOINT": otlp_endpoint}
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**env.process_env(), DRAIN_VARIABLE: str(drain), **tracing_env},
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while http_status(f"{addresses.http}/v2/health/live") != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ServerNotReady(f"tritonserver did not start (exit {proc.poll()}); log {log_file}:\n{log_tail(log_file)}")
            time.sleep(0.3)
        if wait_ready and repository is not None:
            while http_status(f"{addresses.http}/v2/health/ready") != 200:
                text = log_file.read_text(errors="replace")
                if proc.poll() is not None or "failed to load" in text or time.monotonic() > deadline:
                    raise ServerNotReady(f"the model repository did not become ready; log {log_file}:\n{log_tail(log_file)}")
                time.sleep(0.3)
        yield proc, addresses
    finally:
        start_draining(proc)
        # tritonserver 2.51 cannot finish while a gRPC client keeps its stream open (measured: it
        # waits past its own exit timeout until killed; Triton's gRPC graceful shutdown came later)
        stop(proc, EXIT_TIMEOUT_S + 3)
        # the Python-backend stubs outlive a tritonserver that was killed (measured: a stub was
        # still running 15 minutes after its server's SIGKILL); they are in the server's group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(snapshot.parent, ignore_errors=True)


def serve_until_stopped(proc: subprocess.Popen, log_file: Path, apps: list, first: Callable[[], None] | None = None) -> None:
    """Wait while tritonserver serves. When `kiln serve` is stopped (a signal raised into the wait),
    `first` runs, the running requests end, then the apps in front (`RunningApp`s; their
    connections to tritonserver close), and the exception goes on; when tritonserver stops by
    itself, that is a death: ServerDied with the log's last lines."""
    try:
        proc.wait()
    finally:
        if first is not None:
            first()
        start_draining(proc)
        for app in apps:
            if app is not None:
                app.stop()
    raise ServerDied(f"tritonserver stopped serving ({exit_description(proc.returncode)}); last lines of {log_file}:\n{log_tail(log_file)}")


def served_repository(proc: subprocess.Popen) -> Path:
    """The model repository snapshot a `triton_server` process serves."""
    return Path(next(a.split("=", 1)[1] for a in proc.args if a.startswith("--model-repository=")))


def start_draining(proc: subprocess.Popen) -> None:
    """Tell the server's Kiln models to end their running requests now (finish_reason "cancelled")
    and refuse new ones: at SIGTERM tritonserver waits for in-flight requests (up to its exit
    timeout) before a model learns of the stop, so `kiln serve` says it first, through the file
    `$KILN_DRAIN_FILE` beside the served repository snapshot."""
    drain_file(served_repository(proc)).touch()


def drain_file(snapshot: Path) -> Path:
    """The drain file of a served repository snapshot (passed to the server as `$KILN_DRAIN_FILE`)."""
    return snapshot.parent / "drain"


@dataclass
class RunningApp:
    server: Any  # uvicorn.Server
    thread: Any  # threading.Thread

    def stop(self, timeout: float = 10) -> None:
        """Stop serving and wait for the app's shutdown (the HTTP guard closes its connections to
        tritonserver, which otherwise waits out its 30 s exit timeout for them, measured)."""
        self.server.should_exit = True
        self.thread.join(timeout)


def run_app(app, host: str, port: int, option: str, what: str, timeout: float = 30) -> RunningApp:
    """An ASGI app on uvicorn in a daemon thread, returned once it listens; a port it cannot take
    is a clear error naming the option that chooses another. Open requests get 5 s at shutdown."""
    import threading

    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="auto", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ServerNotReady(f"{what} could not listen on {host}:{port} (port in use?); choose another with {option}")
        time.sleep(0.05)
    return RunningApp(server, thread)


def stop(proc: subprocess.Popen, timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
