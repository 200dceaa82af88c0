"""`kiln models list|show|pull`, `kiln promote`, `kiln rollback`, `kiln ui`: the registry from the terminal.

    kiln models list
    kiln models show smollm2-135m-int4@production
    kiln models diff smollm2-135m-int4@production smollm2-135m-int4@staging
    kiln promote smollm2-135m-int4 3 --to staging
    kiln promote smollm2-135m-int4 3 --to production
    kiln rollback smollm2-135m-int4
    kiln ui
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from pipeline.console import fail, make_console
from pipeline.errors import KilnError, PromotionRefused
from pipeline.metric_table import COLUMNS
from pipeline.registry.refs import VersionRef, resolve

models_app = typer.Typer(no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]}, help="Browse the model registry: registered models, versions, aliases, metrics.")

StoreOpt = Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else artifacts/mlflow.db).")]
ArtifactsOpt = Annotated[Optional[Path], typer.Option("--artifacts", help="Artifacts root (default: $KILN_ARTIFACTS or ./artifacts).")]


def store_failures_reported(command):
    """A tracking server's refusal (no login, no permission: exit 11, naming the identity) or a store
    that does not answer (exit 8), raised anywhere in `command`, ends it with one line, not a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from pipeline.registry.store import access_denied, unreachable

        try:
            return command(*args, **kwargs)
        except Exception as e:
            failure = access_denied(e) or unreachable(e)
            if failure is None:
                raise
            fail(make_console(), failure)

    return wrapper


def open_store(tracking_uri: str | None, artifacts: Path | None):
    """(settings, tracking URI, client) with MLflow's own chatter off."""
    from pipeline.registry.store import client_for
    from pipeline.settings import Settings

    settings = Settings.from_env(artifacts)
    uri = settings.tracking_uri(tracking_uri)
    return settings, uri, client_for(uri)


def open_registry(tracking_uri: str | None, artifacts: Path | None):
    from pipeline.registry.promotion import Registry

    settings, uri, client = open_store(tracking_uri, artifacts)
    return Registry(client, uri, settings.artifacts_root / "registry", settings.actor)


def numeric_columns() -> list[str]:
    return [row.column for row in COLUMNS]


def version_row(r: dict) -> list[str]:
    cells = [row.format(r[row.key]) for row in COLUMNS]
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_ms"] / 1000))
    return [str(r["version"]), r["aliases"], r["method"] or "?", r["target"] or "?", *cells, r["validated"] or "?", created]


@models_app.command("list")
@store_failures_reported
def list_models(tracking_uri: StoreOpt = None, artifacts: ArtifactsOpt = None) -> None:
    """Registered models with their newest version and aliases.

    Example: kiln models list
    """
    console = make_console()
    _, uri, client = open_store(tracking_uri, artifacts)
    table = Table(title=f"Registered models ({uri})")
    for col in ("name", "versions", "newest", "aliases", "description"):
        table.add_column(col)
    for model in client.search_registered_models(order_by=["name ASC"]):
        versions = client.search_model_versions(f"name='{model.name}'")
        newest = max((int(v.version) for v in versions), default=0)
        aliases = ", ".join(f"@{a}→{v}" for a, v in sorted((model.aliases or {}).items()))
        table.add_row(model.name, str(len(versions)), str(newest or "-"), aliases, model.description or "")
    console.print(table)


@models_app.command("show")
@store_failures_reported
def show(ref: Annotated[str, typer.Argument(help="NAME (all versions), NAME/VERSION, NAME@ALIAS or models:/NAME@ALIAS")],
         tracking_uri: StoreOpt = None, artifacts: ArtifactsOpt = None) -> None:
    """All versions of a model, or one version in full (metrics, lineage tags, audit log).

    Example: kiln models show smollm2-135m-int4@production
    """
    from pipeline.registry.browse import version_records
    from pipeline.registry.promotion import LEGACY_AUDIT_PREFIX, audit_log

    console = make_console()
    try:
        parsed = VersionRef.parse(ref)
        _, uri, client = open_store(tracking_uri, artifacts)
        if parsed.version is None and parsed.alias is None:
            resolve(client, parsed)  # a clear error when the model does not exist
            table = Table(title=f"{parsed.name} ({uri})")
            numeric = set(numeric_columns())
            for col in ("version", "aliases", "method", "target", *numeric_columns(), "validated", "created"):
                table.add_column(col, justify="right" if col in numeric else "left")
            for record in version_records(client, parsed.name):
                table.add_row(*version_row(record))
            console.print(table)
            return
        mv = resolve(client, parsed)
    except KilnError as e:
        fail(console, e)
    run = client.get_run(mv.run_id)
    console.print(f"[bold]{mv.name}[/bold] version [bold]{mv.version}[/bold]  aliases: "
                  f"{', '.join('@' + a for a in sorted(mv.aliases or [])) or 'none'}  run {mv.run_id}")
    console.print(f"source: {mv.source}")
    metrics = Table(title="metrics")
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    for k, v in sorted(run.data.metrics.items()):
        metrics.add_row(k, f"{v:.4g}")
    console.print(metrics)
    tags = Table(title="lineage")
    tags.add_column("tag")
    tags.add_column("value")
    for k, v in sorted(mv.tags.items()):
        if not k.startswith(LEGACY_AUDIT_PREFIX):
            tags.add_row(k, v)
    console.print(tags)
    for event in audit_log(client, mv):
        console.print(f"audit: {event['at']} {event['by']}: {event['action']} @{event['alias']} → {event['result']}"
                      + (f" (previous {event['previous_version']})"
                         if event.get("previous_version") and str(event["previous_version"]) != str(mv.version) else "")
                      + "".join(f"\n    {r}" for r in event.get("reasons", [])))


@models_app.command("pull")
@store_failures_reported
def pull(ref: Annotated[str, typer.Argument(help="NAME@ALIAS, NAME/VERSION or models:/NAME@ALIAS (a bare NAME: its newest version, said)")],
         dest: Annotated[Optional[Path], typer.Option(help="Folder (default: artifacts/registry/NAME-vVERSION)")] = None,
         tracking_uri: StoreOpt = None, artifacts: ArtifactsOpt = None) -> None:
    """Download a version's engine, validation report and Triton package, each checked against its
    sha256 manifest; prints one JSON line of paths (stdout), and what it did on stderr.

    Example: kiln models pull smollm2-135m-int4@production --dest ./prod && kiln serve ./prod
    """
    from pipeline.registry.fetch import fetch_triton_repository, fetch_version, has_package

    console = Console(stderr=True, highlight=False)
    try:
        registry = open_registry(tracking_uri, artifacts)
        parsed = VersionRef.parse(ref)
        mv = resolve(registry.client, parsed)
        if not parsed.alias and not parsed.version:
            console.print(f"{ref}: no version or alias given, taking the newest: version {mv.version}")
        folder = dest or registry.workdir / f"{mv.name}-v{mv.version}"
        fetched = fetch_version(registry.client, registry.tracking_uri, mv, folder)
        repository = (fetch_triton_repository(registry.client, registry.tracking_uri, mv, folder / "triton")
                      if has_package(registry.client, mv) else None)
    except KilnError as e:
        fail(console, e)
    console.print(f"{mv.name} version {mv.version}: sha256 verified"
                  + (f"; serve it with: kiln serve {folder}" if repository else " (no Triton package: its recipe had none)"))
    print(json.dumps({"name": fetched.name, "version": fetched.version, "engine_dir": str(fetched.engine_dir),
                      "validation_dir": str(fetched.validation_dir), "triton_repository": repository and str(repository)}))


@models_app.command("diff")
@store_failures_reported
def diff(a: Annotated[str, typer.Argument(help="First version: NAME/VERSION, NAME@ALIAS or models:/NAME@ALIAS")],
         b: Annotated[str, typer.Argument(help="Second version (compared against the first)")],
         as_json: Annotated[bool, typer.Option("--json", help="Print the differences as one JSON object.")] = False,
         tracking_uri: StoreOpt = None, artifacts: ArtifactsOpt = None) -> None:
    """Two versions side by side: metrics, gates, lineage and recipe settings (differences only for
    lineage and recipe). Each version's gates come from its validation report, checked against the
    registered sha256 digest.

    Example: kiln models diff smollm2-135m-int4@production smollm2-135m-int4@staging
    """
    from pipeline.registry.diff import diff_versions

    console = make_console()
    try:
        _, uri, client = open_store(tracking_uri, artifacts)
        mv_a, mv_b = (resolve(client, VersionRef.parse(ref)) for ref in (a, b))
        result = diff_versions(client, uri, mv_a, mv_b)
    except KilnError as e:
        fail(console, e)
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
        return
    marks = {"better": "[green]better[/green]", "worse": "[red]worse[/red]", "same": "same", None: ""}
    metrics = Table(title=f"metrics: {result.b} vs {result.a}")
    for col in ("metric", result.a, result.b, "change", ""):
        metrics.add_column(col, justify="left" if col == "metric" else "right")
    for m in result.metrics:
        metrics.add_row(m["label"], m["a_text"], m["b_text"], m["change"] or "", marks[m["verdict"]])
    console.print(metrics)
    gates = Table(title="gates")
    for col in ("gate", result.a, result.b):
        gates.add_column(col)
    for g in result.gates:
        gates.add_row(g["gate"], g["a"] or "(not set)", g["b"] or "(not set)")
    console.print(gates if result.gates else "gates: none set on either version")
    for title, rows, empty in (("lineage (tags that differ)", result.lineage, "lineage: identical"),
                               ("recipe (settings that differ)", result.recipe, "recipe: identical settings")):
        if not rows:
            console.print(empty)
            continue
        table = Table(title=title)
        for col in ("key", result.a, result.b):
            table.add_column(col, overflow="fold")
        for key, x, y in rows:
            table.add_row(key, "-" if x is None else x, "-" if y is None else y)
        console.print(table)
    console.print(f"{result.same_lineage} lineage tags are the same on both.")


def comparison_table(decision) -> Table:
    table = Table(title=f"challenger {decision.name} v{decision.version} vs champion @production v{decision.previous}")
    for col in ("metric", f"champion v{decision.previous}", f"challenger v{decision.version}", "worse by", "limit", ""):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for r in decision.comparison:
        table.add_row(r.label, f"{r.champion:.4g}", f"{r.challenger:.4g}", f"{r.change:+.3g} {r.unit}", f"{r.limit:g} {r.unit}",
                      "[green]ok[/green]" if r.passed else "[red]regressed[/red]")
    return table


@store_failures_reported
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name (or NAME/VERSION, NAME@ALIAS).")],
    version: Annotated[Optional[str], typer.Argument(help="Version number.")] = None,
    to: Annotated[str, typer.Option("--to", help="staging | production")] = "staging",
    force: Annotated[bool, typer.Option("--force", help="Promote although a gate refuses (recorded); integrity is never overridden.")] = False,
    tracking_uri: StoreOpt = None,
    artifacts: ArtifactsOpt = None,
) -> None:
    """Point the staging or production alias at a version, if its gates allow.

    Example: kiln promote smollm2-135m-int4 2 --to production
    """
    console = make_console()
    if to not in ("staging", "production"):
        fail(console, KilnError(f"--to {to!r}: allowed values are staging, production"))
    try:
        ref = VersionRef.parse(f"{name}/{version}" if version else name)
        registry = open_registry(tracking_uri, artifacts)
        decision = registry.decide(ref, to)
        if decision.comparison:
            console.print(comparison_table(decision))
        result = registry.apply(decision, force=force)
    except KilnError as e:
        fail(console, e)
    for reason in decision.reasons():
        console.print(f"[red]✗[/red] {reason}")
    if result == "refused":
        fail(console, PromotionRefused(f"{decision.name} version {decision.version} not promoted to {to} "
                                       "(recorded on the version; --force overrides)"))
    if decision.previous == decision.version:
        was = " (it already was; gates checked again)"
    else:
        was = f" (was version {decision.previous})" if decision.previous else ""
    verdict = {"accepted": "gates passed", "forced": "forced past a refusing gate (--force)"}[result]
    console.print(f"[green]✓[/green] {decision.name}@{to} → version {decision.version}{was}: {verdict}; "
                  f"audit record on version {decision.version} by {registry.actor}")


@store_failures_reported
def rollback(name: Annotated[str, typer.Argument(help="Registered model name.")],
             tracking_uri: StoreOpt = None, artifacts: ArtifactsOpt = None) -> None:
    """Move the production alias back to the previous production version (recorded on both).

    Example: kiln rollback smollm2-135m-int4
    """
    console = make_console()
    try:
        registry = open_registry(tracking_uri, artifacts)
        old, new = registry.rollback(name)
    except KilnError as e:
        fail(console, e)
    console.print(f"[green]✓[/green] {name}@production → version {new} (rolled back from version {old}), recorded as {registry.actor}")


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def entry_url(url: str, tracking_uri: str) -> str:
    """Where `kiln ui` sends a user: the runs of the newest experiment Kiln wrote, in MLflow 3's
    "model training" mode (its sidebar has the model registry; the default GenAI mode has neither,
    and the UI keeps the mode per browser, so a link is the only way a server can choose it)."""
    from pipeline.registry.store import EXPERIMENT_KIND, client_for

    [(key, value)] = EXPERIMENT_KIND.items()
    try:
        experiments = client_for(tracking_uri).search_experiments(filter_string=f"tags.`{key}` = '{value}'",
                                                                  order_by=["last_update_time DESC"], max_results=1)
    except Exception:  # noqa: BLE001 (the plain address still works)
        return url
    return f"{url}/#/experiments/{experiments[0].experiment_id}/runs?workflowType=machine_learning" if experiments else url


def ui(port: Annotated[int, typer.Option(help="Port to listen on.")] = 5000,
       host: Annotated[str, typer.Option(help="Interface; 127.0.0.1 keeps the store private to this machine.")] = "127.0.0.1",
       tracking_uri: StoreOpt = None, artifacts: ArtifactsOpt = None) -> None:
    """Start the MLflow UI on the project's store and print its URL (Ctrl-C stops it).

    Example: kiln ui --port 5000
    """
    console = make_console()
    try:
        settings, uri, _ = open_store(tracking_uri, artifacts)
    except KilnError as e:  # a copied store (StoreMoved): one line and its exit code, as `kiln run` and `promote` give
        fail(console, e)
    if uri.startswith(("http://", "https://")):
        console.print(f"The store is a tracking server: its UI is {uri}")
        return
    url = f"http://{host}:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # halves the server's processes
    # the server's own start-up warnings go to a log file, so the URL is the first thing printed
    log_file = settings.artifacts_root / "logs" / f"mlflow-ui-{time.strftime('%Y%m%d-%H%M%S')}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log = log_file.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host,
                             "--port", str(port), "--workers", "1"], env=env, stdout=log, stderr=subprocess.STDOUT)

    def stop(signum, frame):
        raise KeyboardInterrupt  # a terminated `kiln ui` stops its server too, instead of orphaning it

    signal.signal(signal.SIGTERM, stop)
    try:
        if not wait_healthy(url, proc, 120):
            tail = "".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-15:])
            console.print(f"[bold red]error[/bold red]: the MLflow UI did not start; the end of its log ({log_file}):\n{tail}")
            raise typer.Exit(proc.poll() or 1)
        print(f"MLflow UI: {entry_url(url, uri)}  (store {uri}; Ctrl-C stops it; server log {log_file})", flush=True)
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
