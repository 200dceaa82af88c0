"""`kiln serve`: Triton Inference Server on a Kiln package, local or from the registry.

    kiln serve models:/smollm2-135m-int4              # every alias, following the registry (fleet.py)
    kiln serve models:/smollm2-135m-int4@staging      # the version the alias names at start, pinned
    kiln serve artifacts/cache/package/<key>          # a local package stage folder
    kiln serve ./prod                                 # a folder `kiln models pull` wrote
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.artifacts import verify
from pipeline.console import fail, make_console
from pipeline.errors import IntegrityError, KilnError
from pipeline.registry.commands import ArtifactsOpt, StoreOpt, open_registry, store_failures_reported
from pipeline.settings import Settings


def package_root(path: Path) -> Path | None:
    """The Kiln package folder (`manifest.json` beside `model_repository/`) that `path` is or lies in:
    the package itself, its model repository, a model folder or a version folder."""
    if (path / "triton" / "model_repository").is_dir():  # what `kiln models pull` writes
        path = path / "triton"
    for folder in (path, *path.parents):
        if (folder / "model_repository").is_dir() and (folder / "manifest.json").is_file():
            return folder
    return None


def local_repository(path: Path) -> Path:
    """The model repository to serve, after the whole package it belongs to (config.pbtxt, model.py,
    engine, tokenizer) passed its sha256 manifest, whichever of its folders was named."""
    root = package_root(path.resolve())
    if root is None:
        raise IntegrityError(f"{path} is not inside a Kiln package (a folder with manifest.json beside model_repository/); "
                             "kiln serve only serves what a manifest covers: give the package folder, e.g. "
                             "artifacts/cache/package/<key>, or a registry reference models:/NAME@ALIAS")
    verify(root, full=True)
    return root / "model_repository"


def refuse_gpu_engines(repository: Path) -> None:
    """`kiln serve`'s serving environment runs CPU engines: a package whose engine needs a GPU is
    refused here, before tritonserver starts, with where it can be served instead."""
    from pipeline.errors import MissingDependency
    from pipeline.targets import REQUIREMENTS

    for serving in sorted(repository.glob("*/*/serving.json")):
        target = json.loads(serving.read_text())["session_options"].get("target", "onnxruntime-cpu")
        if REQUIREMENTS[target].needs_nvidia_gpu:
            raise MissingDependency(
                f"model {serving.parent.parent.name} runs a {target} engine on KIND_GPU instances; the serving environment "
                "`kiln serve` builds runs CPU engines only (onnxruntime without CUDA, no TensorRT). Serve this package with "
                "NVIDIA's Triton image on a GPU host, with onnxruntime-gpu or tensorrt and torch in its Python "
                "(deploy/Dockerfile, docs/deploy.md)")


@store_failures_reported
def serve(
    target: Annotated[Optional[str], typer.Argument(help="models:/NAME@ALIAS, NAME/VERSION, or a local package / model repository folder")] = None,
    host: Annotated[str, typer.Option(help="Interface; 127.0.0.1 keeps the server private to this machine.")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="KServe v2 HTTP port (Triton's HTTP API behind Kiln's body-size guard).")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="KServe v2 gRPC port.")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port.")] = 8002,
    openai_port: Annotated[int, typer.Option(help="OpenAI-compatible API port (/v1/chat/completions); 0: none.")] = 8003,
    max_body_bytes: Annotated[int, typer.Option(min=1024, help="Largest request body the HTTP and OpenAI ports accept.")] = 1 << 20,
    watch_interval: Annotated[float, typer.Option(min=0.2, help="models:/NAME: seconds between polls of the registry's aliases.")] = 5.0,
    route: Annotated[Optional[str], typer.Option(help="models:/NAME: split requests for bare NAME between aliases, "
                                                      "e.g. NAME=production:90,staging:10 (sticky per `user`).")] = None,
    routes: Annotated[Optional[Path], typer.Option(help="models:/NAME: a serving YAML (routes: {NAME: {production: 90, staging: 10}}, "
                                                        "seed: 0), re-read when it changes and on SIGHUP.")] = None,
    route_seed: Annotated[int, typer.Option(help="Seed of the split: the same seed sends a user to the same alias on every replica.")] = 0,
    standby: Annotated[float, typer.Option(min=0, help="models:/NAME: seconds a version stays loaded after its last alias "
                                                       "moved away, so a rollback costs no load.")] = 60.0,
    keys: Annotated[Optional[Path], typer.Option(help="API keys file (`kiln keys add`): every OpenAI request needs a key; its tenant's "
                                                      "model grants and limits apply. Re-read when it changes.")] = None,
    request_log: Annotated[Optional[Path], typer.Option(help="Append one hash-chained JSON line per OpenAI request "
                                                             "(`kiln audit verify FILE` checks it).")] = None,
    log_prompts: Annotated[bool, typer.Option("--log-prompts", help="Also write each prompt into the request log.")] = False,
    otlp_endpoint: Annotated[Optional[str], typer.Option(help="OpenTelemetry collector (OTLP/HTTP, e.g. http://localhost:4318): "
                                                              "a trace per request from the gateway through Triton into the model.")] = None,
    prepare: Annotated[bool, typer.Option("--prepare", help="Only create the serving environment (what `make setup` runs), then exit.")] = False,
    tracking_uri: StoreOpt = None,
    artifacts: ArtifactsOpt = None,
) -> None:
    """Serve a Kiln Triton package with NVIDIA Triton Inference Server (Ctrl-C or SIGTERM stops it),
    with an OpenAI-compatible API beside it.

    The serving environment (Triton's server and Python backend, numpy<2, onnxruntime, tokenizers)
    is created by `make setup` (`kiln serve --prepare`), else on first use, and cached: serving itself
    never needs the network.

    Example: kiln serve models:/smollm2-135m-int4@staging
    """
    from pipeline.registry.fetch import fetch_triton_repository
    from pipeline.registry.refs import VersionRef, resolve
    from pipeline.serving.environment import ensure_environment
    from pipeline.serving.routing import RouteError

    console = make_console()
    if prepare:
        try:
            env = ensure_environment(log=console.print)
        except KilnError as e:
            fail(console, e)
        console.print(f"serving environment ready: {env.root}")
        return
    if target is None:
        fail(console, KilnError("kiln serve needs a TARGET (models:/NAME@ALIAS, NAME/VERSION or a package folder), or --prepare"))
    served_version = served_name = None
    following = None  # the registered model whose aliases this server follows (models:/NAME)
    try:
        ref = None if Path(target).exists() else VersionRef.parse(target)
        whole_model = ref is not None and ref.alias is None and ref.version is None
        if (route or routes) and not whole_model:
            raise RouteError("--route and --routes split a whole registered model: serve models:/NAME (no @ALIAS or /VERSION)")
        if ref is None:
            repository = local_repository(Path(target))
        elif whole_model:
            registry = open_registry(tracking_uri, artifacts)
            resolve(registry.client, ref)  # a clear error now when the model or its versions do not exist
            splits = fleet_splits(ref.name, route, routes, route_seed)
            following, repository = ref.name, None
        else:
            registry = open_registry(tracking_uri, artifacts)
            mv = resolve(registry.client, ref)
            repository = fetch_triton_repository(registry.client, registry.tracking_uri, mv,
                                                 registry.workdir / f"{mv.name}-v{mv.version}-triton")
            console.print(f"{mv.name} version {mv.version}: Triton package sha256 verified")
            served_version, served_name = str(mv.version), mv.name  # Triton's model version = the registry version
        if repository is not None:
            refuse_gpu_engines(repository)
        access = open_access(keys, request_log, log_prompts, otlp_endpoint, console)
        env = ensure_environment(log=console.print)
    except KilnError as e:
        fail(console, e)
    if keys is not None:
        host_backend = "127.0.0.1"  # Triton's own ports check no key: only the OpenAI port faces callers
        console.print(f"API keys: {keys} ({len(access.tenants.doc.tenants)} tenant(s), {len(access.tenants.doc.keys)} key(s)); "
                      f"Triton's HTTP and gRPC ports stay on {host_backend} (its metrics on {host})")
    else:
        host_backend = host
        if openai_port:
            console.print(f"no --keys: the OpenAI port answers anyone who can reach {host} (give --keys FILE to require API keys)")

    def stop(signum, frame):
        # once: a second SIGTERM (a supervisor repeating itself) must not cut the clean stop short,
        # which would leave tritonserver running after kiln serve has gone
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    # never inside the package: it must stay exactly what its manifest lists
    log_file = Settings.from_env(artifacts).artifacts_root / "logs" / f"tritonserver-{time.strftime('%Y%m%d-%H%M%S')}.log"
    ports = (http_port, grpc_port, metrics_port, openai_port)
    try:
        if following is not None:
            serve_following(registry, following, splits, env, log_file, console, hosts=(host, host_backend), ports=ports,
                            max_body_bytes=max_body_bytes, interval=watch_interval, standby=standby, access=access)
        else:
            serve_pinned(repository, served_name, served_version, env, log_file, console, hosts=(host, host_backend), ports=ports,
                         max_body_bytes=max_body_bytes, access=access)
    except KeyboardInterrupt:
        console.print("stopping Triton")
    except KilnError as e:
        fail(console, e)
    finally:
        access.close(console)


@dataclasses.dataclass
class Access:
    """What the OpenAI port checks and records: API keys (tenants.Tenants), the request log, traces."""

    tenants: object | None = None
    request_log: object | None = None
    tracing: object | None = None  # tracing.GatewayTracing
    otlp_endpoint: str | None = None

    def close(self, console) -> None:
        if self.tracing is not None:
            self.tracing.shutdown()  # the spans still queued go out
        if self.request_log is not None:
            self.request_log.close()
            # the chain's head, to keep elsewhere: records cut from the log's end show against it
            console.print(f"request log {self.request_log.path}: {self.request_log.seq} records, head {self.request_log.prev}")


def open_access(keys: Path | None, request_log: Path | None, log_prompts: bool, otlp_endpoint: str | None, console) -> Access:
    from pipeline.serving.request_log import RequestLog
    from pipeline.serving.tenants import Tenants
    from pipeline.serving.tracing import GatewayTracing, traces_url

    tenants = Tenants(keys, log=lambda line: console.print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}")) if keys else None
    log = RequestLog(request_log, with_prompts=log_prompts) if request_log else None
    if log is not None:
        console.print(f"request log: {request_log} (continuing at record {log.seq + 1}{', with prompts' if log_prompts else ''})")
    tracing = None
    if otlp_endpoint:
        if not otlp_endpoint.startswith(("http://", "https://")):
            raise KilnError(f"--otlp-endpoint {otlp_endpoint!r}: an OTLP/HTTP collector URL, e.g. http://localhost:4318")
        tracing = GatewayTracing(otlp_endpoint)
        console.print(f"traces: gateway, tritonserver and model spans to {traces_url(otlp_endpoint)}")
    return Access(tenants, log, tracing, otlp_endpoint)


def serve_pinned(repository: Path, served_name: str | None, served_version: str | None, env, log_file: Path, console, *,
                 hosts: tuple[str, str], ports: tuple[int, int, int, int], max_body_bytes: int, access: Access) -> None:
    """Serve one package (a local folder, or the version a registry reference named at start) until a signal."""
    from pipeline.serving.gateway import Served, pinned_router, run_gateway
    from pipeline.serving.http_guard import HttpGuard
    from pipeline.serving.server import free_ports, run_app, serve_until_stopped, triton_server

    http_port, grpc_port, metrics_port, openai_port = ports
    host, backend = hosts  # the OpenAI port's interface; Triton's (loopback when keys are required)
    models = sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())
    # Triton's own HTTP stays on loopback: the published HTTP port is Kiln's guard in front of it
    # (http_guard.py: a large form-encoded body crashes tritonserver 2.51's HTTP frontend)
    with triton_server(repository, env, log_file, host=backend, ports=(*free_ports(1, avoid=(grpc_port, metrics_port)), grpc_port, metrics_port),
                       http_host="127.0.0.1", metrics_host=host, version=served_version, otlp_endpoint=access.otlp_endpoint) as (proc, triton):
        guard = run_app(HttpGuard(triton.http, max_body_bytes), backend, http_port, "--http-port", "the KServe HTTP port")
        a = dataclasses.replace(triton, http_port=http_port, http_host=None)
        example = json.dumps({"text_input": "What is Python?", "max_tokens": 32})
        version = served_version or "1"
        console.print(f"Triton serving {', '.join(models)} (version {version}): HTTP {a.http}  gRPC {a.grpc}  metrics {a.metrics}  "
                      f"(log {log_file})")
        console.print(f"  curl -s -X POST {a.http}/v2/models/{models[0]}/generate -d '{example}'")
        gateway, openai_url = None, None
        if openai_port:
            served = Served.from_repository(a.grpc, repository, models[0], served_name or models[0], version)
            gateway = run_gateway(pinned_router(served), host, openai_port, max_body_bytes, tenants=access.tenants,
                                  request_log=access.request_log, triton_metrics=triton.metrics, tracing=access.tracing)
            openai_url = f"http://{host}:{openai_port}/v1"
            console.print(f"OpenAI-compatible API: {openai_url} (model {served.model_id!r})")
        print(json.dumps({"http": a.http, "grpc": a.grpc, "metrics": a.metrics, "openai": openai_url, "models": models,
                          "version": version, "pid": proc.pid}), flush=True)
        serve_until_stopped(proc, log_file, [guard, gateway])


def fleet_splits(name: str, route: str | None, routes_file: Path | None, seed: int):
    """The split source for `kiln serve models:/NAME`: `--route` (for this model only) and the routes file."""
    from pipeline.serving.fleet import SplitSource
    from pipeline.serving.routing import RouteError, parse_route_option

    option = None
    if route is not None:
        routed, option = parse_route_option(route)
        if routed != name:
            raise RouteError(f"--route {route!r} names {routed!r}, but this server serves {name!r}")
    if routes_file is not None and not routes_file.is_file():
        raise RouteError(f"--routes {routes_file}: no such file")
    return SplitSource(name, option, routes_file, seed)


def serve_following(registry, name: str, splits, env, log_file: Path, console, *, hosts: tuple[str, str],
                    ports: tuple[int, int, int, int], max_body_bytes: int, interval: float, standby: float, access: Access) -> None:
    """Serve every alias of registered model `name` and follow the registry until a signal."""
    from prometheus_client import CollectorRegistry

    from pipeline.serving.fleet import Fleet, FleetMetrics, TritonAdmin
    from pipeline.serving.gateway import run_gateway
    from pipeline.serving.http_guard import HttpGuard
    from pipeline.serving.routing import Router
    from pipeline.serving.server import free_ports, run_app, serve_until_stopped, served_repository, triton_server

    http_port, grpc_port, metrics_port, openai_port = ports
    host, backend = hosts
    # MLflow's HTTP client retries a store that does not answer for minutes by default (7 retries,
    # exponential backoff, 120 s timeout): a poll must fail within seconds so the outage shows
    # (metric, warning) while the last known aliases keep serving. A user's own settings win.
    for variable, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                            ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
        os.environ.setdefault(variable, value)
    metrics = CollectorRegistry()
    router = Router(seed=splits.seed)
    with triton_server(None, env, log_file, host=backend, ports=(*free_ports(1, avoid=(grpc_port, metrics_port)), grpc_port, metrics_port), http_host="127.0.0.1",
                       metrics_host=host, otlp_endpoint=access.otlp_endpoint) as (proc, triton):
        fleet = Fleet(registry, name, TritonAdmin(triton.http), triton.grpc, served_repository(proc), router, splits,
                      FleetMetrics(metrics), log=lambda line: console.print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}"),
                      interval=interval, standby=standby)
        fleet.start()
        signal.signal(signal.SIGHUP, lambda signum, frame: fleet.reload_routes())
        guard = run_app(HttpGuard(triton.http, max_body_bytes, router.triton_model), backend, http_port, "--http-port",
                        "the KServe HTTP port")
        a = dataclasses.replace(triton, http_port=http_port, http_host=None)
        gateway = openai_url = None
        if openai_port:
            gateway = run_gateway(router, host, openai_port, max_body_bytes, metrics, access.tenants, access.request_log, triton.metrics,
                                  access.tracing)
            openai_url = f"http://{host}:{openai_port}/v1"
        routes = router.routes
        console.print(f"Triton serving {name}, following {registry.tracking_uri} every {interval:g} s: "
                      + ", ".join(f"{e['id']} -> version {e['kiln_version']}" for e in routes.listing() if "/" not in e["id"]))
        console.print(f"  HTTP {a.http}  gRPC {a.grpc}  metrics {a.metrics}  (log {log_file})")
        if openai_url:
            console.print(f"OpenAI-compatible API: {openai_url} (models {name!r}, {name + '@ALIAS'!r}; /metrics beside it)")
        print(json.dumps({"http": a.http, "grpc": a.grpc, "metrics": a.metrics, "openai": openai_url,
                          "models": sorted(x.triton_model for x in fleet.loaded.values()), "aliases": routes.aliases,
                          "version": routes.version_of(routes.default_alias()) if routes.default_alias() else None,
                          "pid": proc.pid}), flush=True)
        serve_until_stopped(proc, log_file, [guard, gateway], first=fleet.stop)
