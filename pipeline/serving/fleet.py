"""Every alias of one registered model served from one tritonserver, following the registry.

`kiln serve models:/NAME` starts tritonserver with explicit model control on an empty repository
snapshot. Each registry version it serves is a Triton model of its own, `NAME-vVERSION` (its Triton
model version is the registry version): versions load and unload independently through Triton's
repository API, each in its own Python-backend process, and two versions' packages may differ in
anything, their `config.pbtxt` included. (One Triton model holding several version folders would
share one config and reload as one model; decisions.md.)

A watcher thread polls the registry's aliases every `interval` seconds. When an alias moves:
  1. the new version's Triton package is downloaded and verified against its sha256 manifest and
     the digest recorded at registration (`fetch_triton_repository`); anything that differs is
     refused, logged and counted, and the alias stays on the version it had;
  2. it is linked into the snapshot and loaded beside the old one, then must answer one health
     generation (a version that fails either is unloaded again, the alias stays);
  3. the router publishes the new alias map in one reference swap: requests that start after it go
     to the new version; requests already streaming on the old one finish there (Triton's unload
     waits for in-flight requests; measured: a stream started before the unload ran to "length");
  4. the old version stays loaded as a warm standby for `standby` seconds, so a rollback right
     after a promotion costs no load, then is unloaded and its snapshot folder removed.
Memory is bounded by the served versions plus one: a standby is unloaded before another version
loads. When the registry cannot be reached the last known aliases keep serving (a warning, the
`kiln_registry_reachable` gauge at 0) until it answers again.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.artifacts import link_tree
from pipeline.errors import IntegrityError, KilnError
from pipeline.serving.gateway import Served
from pipeline.serving.routing import DEFAULT_ALIAS, Router, Routes, Split, read_routes_file

RETRY_FAILED_S = 60.0  # a version that failed to load is tried again after this (a transient download error)


class LoadFailed(KilnError):
    exit_code = 9


@dataclass(frozen=True)
class TritonAdmin:
    """Triton's repository API and a health generation, on its loopback HTTP address."""

    http: str

    def call(self, path: str, body: dict | None = None, timeout: float = 600) -> tuple[int, bytes]:
        req = urllib.request.Request(f"{self.http}{path}", data=json.dumps(body or {}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError as e:  # not answering (dead, or hung past the timeout)
            raise LoadFailed(f"tritonserver did not answer {path}: {e}") from None

    def load(self, model: str) -> None:
        status, body = self.call(f"/v2/repository/models/{model}/load")
        if status != 200:
            raise LoadFailed(f"tritonserver could not load {model}: {error_text(body)}")

    def unload(self, model: str) -> None:
        """Returns at once; Triton unloads the model when its in-flight requests have finished."""
        try:
            self.call(f"/v2/repository/models/{model}/unload", timeout=30)
        except LoadFailed:
            pass  # tritonserver is not answering: nothing is loaded there to unload

    def states(self) -> dict[str, str]:
        try:
            status, body = self.call("/v2/repository/index", timeout=30)
            return {m["name"]: m.get("state", "") for m in json.loads(body)} if status == 200 else {}
        except (LoadFailed, ValueError):
            return {}

    def health_generation(self, model: str, version: str) -> None:
        status, body = self.call(f"/v2/models/{model}/versions/{version}/generate", {"text_input": "Hello", "max_tokens": 1}, 120)
        try:
            answered = status == 200 and "finish_reason" in json.loads(body)
        except ValueError:
            answered = False
        if not answered:
            raise LoadFailed(f"{model} loaded but its health generation failed: {error_text(body)}")


def error_text(body: bytes) -> str:
    try:
        return str(json.loads(body).get("error", body.decode(errors="replace")))
    except (ValueError, AttributeError):
        return body.decode(errors="replace")[:500]


@dataclass
class SplitSource:
    """The canary split for the served model: from `--route` or a routes file (re-read on SIGHUP and
    whenever the file changes)."""

    name: str
    option: Split | None = None
    file: Path | None = None
    seed: int = 0
    split: Split | None = None
    _mtime: float | None = None

    def __post_init__(self):
        self.split = self.option
        self.reload()

    def reload(self, force: bool = False) -> bool:
        """Read the file again when it changed (or `force`); True when what it says changed. A bad
        file raises RouteError and keeps the split in force."""
        if self.file is None:
            return False
        mtime = self.file.stat().st_mtime if self.file.exists() else None
        if not force and self._mtime is not None and mtime == self._mtime:
            return False
        self._mtime = mtime
        splits, seed = read_routes_file(self.file)
        old = (self.split, self.seed)
        self.split = splits.get(self.name, self.option)
        self.seed = seed if seed is not None else self.seed
        return (self.split, self.seed) != old


@dataclass
class Loaded:
    version: str
    triton_model: str
    served: Served
    folder: Path
    standby_until: float | None = None  # set while no alias points here


@dataclass
class FleetMetrics:
    registry: object  # prometheus_client.CollectorRegistry

    def __post_init__(self):
        from prometheus_client import Counter, Gauge

        r = self.registry
        self.reachable = Gauge("kiln_registry_reachable", "1 when the last poll of the model registry succeeded", registry=r)
        self.poll_failures = Counter("kiln_registry_poll_failures", "Registry polls that failed", registry=r)
        self.alias_version = Gauge("kiln_alias_version", "The registry version each alias is served from", ["model", "alias"], registry=r)
        self.switches = Counter("kiln_alias_switches", "Times an alias moved to another served version", ["model", "alias"], registry=r)
        self.loads = Counter("kiln_version_loads", "Version loads by result (ok, refused: integrity, failed: load or health)",
                             ["model", "version", "result"], registry=r)
        self.loaded = Gauge("kiln_versions_loaded", "Versions loaded in tritonserver (served and standby)", ["model"], registry=r)


@dataclass
class Fleet:
    registry: object  # pipeline.registry.promotion.Registry
    name: str
    admin: TritonAdmin
    grpc_url: str
    snapshot: Path  # tritonserver's model repository (explicit model control)
    router: Router
    splits: SplitSource
    metrics: FleetMetrics
    log: Callable[[str], None] = print
    interval: float = 5.0
    standby: float = 30.0
    loaded: dict[str, Loaded] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> version as served (may lag the registry)
    newest: str | None = None
    failed: dict[str, float] = field(default_factory=dict)  # version -> when it failed
    unloading: dict[str, Path] = field(default_factory=dict)  # triton model -> snapshot folder to remove
    _stop: threading.Event = field(default_factory=threading.Event)
    _reload_routes: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _registry_down: bool = False

    # --- the registry side

    def read_registry(self) -> tuple[dict[str, str], str | None]:
        """The model's aliases now, and its newest version (answered for bare NAME while no @production)."""
        from mlflow.exceptions import MlflowException

        from pipeline.errors import RegistryError

        client = self.registry.client
        try:
            model = client.get_registered_model(self.name)
        except MlflowException as e:
            if "RESOURCE_DOES_NOT_EXIST" in str(getattr(e, "error_code", "")):
                raise RegistryError(f"no registered model {self.name!r} in {self.registry.tracking_uri}") from None
            raise
        aliases = {a: str(v) for a, v in (model.aliases or {}).items()}
        newest = None
        if DEFAULT_ALIAS not in aliases:
            versions = client.search_model_versions(f"name='{self.name}'")
            newest = str(max(int(v.version) for v in versions)) if versions else None
        return aliases, newest

    def poll(self) -> None:
        try:
            aliases, newest = self.read_registry()
        except Exception as e:  # noqa: BLE001 (any failure to reach the store: keep serving what is loaded)
            self.metrics.reachable.set(0)
            self.metrics.poll_failures.inc()
            if not self._registry_down:
                self.log(f"warning: the registry at {self.registry.tracking_uri} cannot be read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}); serving the last known aliases")
            self._registry_down = True
            return
        if self._registry_down:
            self.log("the registry answers again")
        self._registry_down = False
        self.metrics.reachable.set(1)
        self.reconcile(aliases, newest)

    # --- loading and unloading

    def triton_model(self, version: str) -> str:
        return f"{self.name}-v{version}"

    def load(self, version: str) -> Loaded:
        from pipeline.registry.fetch import fetch_triton_repository
        from pipeline.serving.commands import refuse_gpu_engines

        started = time.monotonic()
        client = self.registry.client
        try:
            mv = client.get_model_version(self.name, version)
            repository = fetch_triton_repository(client, self.registry.tracking_uri, mv,
                                                 self.registry.workdir / f"{self.name}-v{version}-triton")
            refuse_gpu_engines(repository)
        except IntegrityError:
            self.metrics.loads.labels(self.name, version, "refused").inc()
            raise
        except Exception as e:  # noqa: BLE001 (the store or its artifacts failing mid-download: the alias stays)
            self.metrics.loads.labels(self.name, version, "failed").inc()
            if isinstance(e, KilnError):
                raise
            raise LoadFailed(f"could not fetch the package: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}") from None
        [package_model] = [p for p in repository.iterdir() if (p / "config.pbtxt").is_file()]
        model = self.triton_model(version)
        folder = self.snapshot / model
        self.unloading.pop(model, None)  # loaded again before an unload finished: the folder is this load's now
        shutil.rmtree(folder, ignore_errors=True)
        link_tree(package_model, folder)
        # the package's config names its own model; this copy is a new file, the package stays as verified
        config = folder / "config.pbtxt"
        text = config.read_text().replace(f'name: "{package_model.name}"', f'name: "{model}"', 1)
        config.unlink()
        config.write_text(text)
        (folder / "1").rename(folder / version)  # Triton's model version = the registry version
        try:
            self.admin.load(model)
            self.admin.health_generation(model, version)
        except KilnError:
            self.admin.unload(model)
            self.unloading[model] = folder
            self.metrics.loads.labels(self.name, version, "failed").inc()
            raise
        self.metrics.loads.labels(self.name, version, "ok").inc()
        served = Served.from_repository(self.grpc_url, self.snapshot, model, self.name, version)
        self.log(f"{self.name} version {version}: package sha256 verified, loaded as Triton model {model} "
                 f"({time.monotonic() - started:.1f} s)")
        return Loaded(version, model, served, folder)

    def unload(self, loaded: Loaded) -> None:
        self.admin.unload(loaded.triton_model)
        self.unloading[loaded.triton_model] = loaded.folder
        del self.loaded[loaded.version]
        self.metrics.loaded.labels(self.name).set(len(self.loaded))
        self.log(f"{self.name} version {loaded.version}: unloading (requests still running on it finish first)")

    def sweep(self, now: float, everything_idle: bool = False) -> None:
        """Unload standbys whose time is up (all of them when `everything_idle`: a load needs the room),
        and remove the snapshot folders of models Triton has finished unloading."""
        for loaded in list(self.loaded.values()):
            if loaded.standby_until is not None and (everything_idle or now >= loaded.standby_until):
                self.unload(loaded)
        if self.unloading:
            states = self.admin.states()
            for model, folder in list(self.unloading.items()):
                if states.get(model) in ("UNAVAILABLE", None):
                    shutil.rmtree(folder, ignore_errors=True)
                    del self.unloading[model]

    # --- the alias map

    def reconcile(self, aliases: dict[str, str], newest: str | None) -> None:
        now = time.monotonic()
        wanted = set(aliases.values()) | ({newest} if newest else set())
        for version in sorted(wanted - set(self.loaded), key=int):
            if now - self.failed.get(version, -RETRY_FAILED_S) < RETRY_FAILED_S:
                continue
            self.sweep(now, everything_idle=True)  # at most the served versions plus the one loading
            try:
                self.loaded[version] = self.load(version)
                self.failed.pop(version, None)
            except KilnError as e:
                self.failed[version] = now
                keeps = sorted(f"@{a}" for a, v in aliases.items() if v == version)
                self.log(f"error: {self.name} version {version} refused ({type(e).__name__}): {e}; "
                         f"{', '.join(keeps) or 'bare ' + self.name} stays on the version it had")
        served = {}
        for alias, version in aliases.items():
            version = version if version in self.loaded else self.aliases.get(alias)
            if version in self.loaded:
                served[alias] = version
        newest = newest if newest in self.loaded else (self.newest if self.newest in self.loaded else None)
        if served != self.aliases or newest != self.newest:
            self.publish(served, newest)
        in_use = set(served.values()) | ({newest} if newest else set())
        for loaded in self.loaded.values():
            if loaded.version in in_use:
                loaded.standby_until = None
            elif loaded.standby_until is None:
                loaded.standby_until = now + self.standby
                self.log(f"{self.name} version {loaded.version}: no alias points here; kept loaded {self.standby:.0f} s as a warm standby")
        self.sweep(now)
        self.metrics.loaded.labels(self.name).set(len(self.loaded))

    def publish(self, served: dict[str, str], newest: str | None) -> None:
        for alias, version in served.items():
            if self.aliases.get(alias) != version:
                if alias in self.aliases:
                    self.metrics.switches.labels(self.name, alias).inc()
                self.log(f"{self.name}@{alias}: now version {version}" + (f" (was {self.aliases[alias]})" if alias in self.aliases else ""))
            self.metrics.alias_version.labels(self.name, alias).set(int(version))
        for alias in set(self.aliases) - set(served):
            self.metrics.alias_version.remove(self.name, alias)
            self.log(f"{self.name}@{alias}: removed from the registry; no longer served")
        self.aliases, self.newest = served, newest
        self.router.publish(Routes(self.name, dict(served), {v: x.served for v, x in self.loaded.items()},
                                   self.splits.split, newest))

    # --- the watcher

    def start(self) -> None:
        """Load what the registry's aliases name now (a KilnError when nothing can be served), then
        follow the registry in a daemon thread."""
        aliases, newest = self.read_registry()
        if not aliases and newest is None:
            from pipeline.errors import RegistryError

            raise RegistryError(f"{self.name} has no versions to serve")
        self.metrics.reachable.set(1)
        self.reconcile(aliases, newest)
        if not self.aliases and self.newest is None:
            raise LoadFailed(f"no version of {self.name} could be loaded (see the errors above)")
        self._thread = threading.Thread(target=self._follow, name="kiln-registry-watcher", daemon=True)
        self._thread.start()

    def reload_routes(self) -> None:
        """SIGHUP: read the routes file again at the next tick (now, from a signal handler's point of view)."""
        self._reload_routes.set()

    def _follow(self) -> None:
        while not self._stop.wait(self.interval if not self._reload_routes.is_set() else 0):
            try:
                self.refresh_split()
                self.poll()
            except Exception as e:  # noqa: BLE001 (the watcher must outlive any one bad tick)
                self.log(f"error: following the registry: {type(e).__name__}: {e}")

    def refresh_split(self) -> None:
        from pipeline.serving.routing import RouteError

        forced = self._reload_routes.is_set()
        self._reload_routes.clear()
        try:
            changed = self.splits.reload(force=forced)
        except RouteError as e:
            self.log(f"error: {e}; the split in force stays ({self.splits.split or 'none'})")
            return
        if changed:
            self.router.reseed(self.splits.seed)
            self.publish(self.aliases, self.newest)
            self.log(f"route for {self.name}: {self.splits.split or '@' + DEFAULT_ALIAS} (seed {self.splits.seed})")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
