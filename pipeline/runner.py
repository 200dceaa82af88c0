"""The runner: stages in order, each cached by a content key, written atomically, timed and logged.

A stage's cache key is sha256 of: its config section, its input artifacts' content digests, and
the code version. Its output lands in `artifacts/cache/<stage>/<key>/` only when complete, so a
failed or killed run leaves every finished stage reusable.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.artifacts import MANIFEST, Artifact, publish_dir, read_manifest, verify, write_manifest
from pipeline.errors import IntegrityError, KilnError, StageFailed
from pipeline.hashing import sha256_json
from pipeline.memory import CHILD_PEAK_KEY, StagePeak, disk_usage_mb
from pipeline.settings import Settings


@dataclass(frozen=True)
class RunContext:
    """Everything a run shares, passed explicitly (no globals)."""

    settings: Settings
    console: Console
    code_version: str
    started_ms: int = field(default_factory=lambda: int(time.time() * 1000))  # the registered run's start (its Duration)

    @property
    def cache_root(self) -> Path:
        return self.settings.artifacts_root / "cache"


@dataclass(frozen=True)
class StageContext:
    """What a stage may touch: its own fresh output folder, a logger and progress bars."""

    run: RunContext
    stage: str
    out_dir: Path
    key: str = ""  # this build's cache key (register tags the model version with it)

    def log(self, message: str) -> None:
        self.run.console.print(f"  [dim]{self.stage}:[/dim] {message}")

    @contextlib.contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        columns = (TextColumn(f"  {self.stage}: {description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.run.console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)


@dataclass(frozen=True)
class StageSpec:
    """One stage of a recipe: its function, typed output, config and upstream stage names."""

    name: str
    run: Callable[..., Artifact]
    artifact_type: type[Artifact]
    config: Any
    inputs: tuple[str, ...] = ()
    # Values that change the output but are not in the recipe section (e.g. the resolved MLflow URI).
    key_extra: Mapping[str, Any] = field(default_factory=dict)
    backend: str = ""
    # Called on a cached artifact; False means the outside world lost it (e.g. a deleted MLflow store).
    still_valid: Callable[[Artifact], bool] | None = None
    # Called on the artifact (built or reused) before the next stage, e.g. to enforce quality gates.
    check: Callable[[Artifact], None] | None = None
    # Digest of the code this stage runs (`hashing.code_digest` of its module); None: the run's
    # whole code version.
    code: str | None = None

    def config_json(self) -> Any:
        dump = getattr(self.config, "model_dump", None)
        return dump(mode="json", by_alias=True) if dump else self.config


@dataclass(frozen=True)
class StageOutcome:
    name: str
    status: str  # "reused" | "built"
    seconds: float
    key: str
    artifact: Artifact


@dataclass(frozen=True)
class PlanRow:
    name: str
    action: str  # "reuse" | "build"
    key: str | None
    path: Path | None
    backend: str


def stage_key(spec: StageSpec, inputs: Mapping[str, Artifact], code_version: str) -> str:
    return sha256_json(
        {
            "stage": spec.name,
            "config": spec.config_json(),
            "extra": dict(spec.key_extra),
            "inputs": {n: a.digest for n, a in sorted(inputs.items())},
            "code": code_version,
        }
    )[:24]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(stage_dir: Path) -> None:
    """Temp folders are named `.tmp-<key>-<pid>`; remove those whose process is gone."""
    if not stage_dir.is_dir():
        return
    for p in stage_dir.glob(".tmp-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


class Runner:
    def __init__(self, ctx: RunContext, specs: list[StageSpec]):
        names = [s.name for s in specs]
        for s in specs:
            unknown = [i for i in s.inputs if i not in names[: names.index(s.name)]]
            if unknown:
                raise ValueError(f"stage {s.name} needs {unknown}, which do not run before it")
        self.ctx = ctx
        self.specs = specs

    def _final_dir(self, spec: StageSpec, key: str) -> Path:
        return self.ctx.cache_root / spec.name / key

    def _load_cached(self, spec: StageSpec, key: str) -> Artifact | None:
        folder = self._final_dir(spec, key)
        if not (folder / MANIFEST).is_file():
            return None
        # Every file's sha256 before reuse: a flipped byte in a cached engine must never be reused,
        # packaged or registered (the cost on the SmolLM2 demo is in docs/decisions.md).
        try:
            manifest = verify(folder, full=True)
        except IntegrityError as e:
            # Damaged by hand or by a crash of something else: keep it for inspection, rebuild.
            aside = folder.with_name(f".damaged-{key}-{int(time.time())}")
            os.rename(folder, aside)
            self.ctx.console.print(f"[yellow]![/yellow] {spec.name}: cached output failed its manifest ({e}); moved to {aside}, rebuilding")
            return None
        artifact = spec.artifact_type(path=folder, digest=manifest["digest"], meta=manifest["meta"])
        if spec.still_valid is not None and not spec.still_valid(artifact):
            return None
        return artifact

    def plan(self) -> list[PlanRow]:
        """Which stages would be reused or built, without running anything."""
        rows: list[PlanRow] = []
        known: dict[str, Artifact] = {}
        for spec in self.specs:
            if any(i not in known for i in spec.inputs):
                rows.append(PlanRow(spec.name, "build", None, None, spec.backend))
                continue
            key = stage_key(spec, {i: known[i] for i in spec.inputs}, spec.code or self.ctx.code_version)
            cached = self._load_cached(spec, key)
            if cached is not None:
                known[spec.name] = cached
            rows.append(
                PlanRow(spec.name, "reuse" if cached else "build", key, self._final_dir(spec, key), spec.backend)
            )
        return rows

    def run(self) -> list[StageOutcome]:
        outcomes: list[StageOutcome] = []
        done: dict[str, Artifact] = {}
        console = self.ctx.console
        for spec in self.specs:
            inputs = {i: done[i] for i in spec.inputs}
            key = stage_key(spec, inputs, spec.code or self.ctx.code_version)
            t0 = time.perf_counter()
            artifact = self._load_cached(spec, key)
            if artifact is not None:
                status, done_line = "reused", f"{spec.name}: reused [dim]{artifact.path}[/dim]"
            else:
                status = "built"
                console.print(f"[cyan]▶[/cyan] {spec.name}: building [dim](key {key})[/dim]")
                artifact = self._build(spec, key, inputs)
                done_line = f"{spec.name}: built in {time.perf_counter() - t0:.1f} s [dim]{artifact.path}[/dim]"
            if spec.check is not None:  # e.g. validate's gates: no ✓ for a stage whose check fails the run
                try:
                    spec.check(artifact)
                except KilnError:
                    console.print(f"[red]✗[/red] {done_line}; its check failed (below)")
                    raise
            console.print(f"[green]✓[/green] {done_line}")
            outcome = StageOutcome(spec.name, status, time.perf_counter() - t0, key, artifact)
            outcomes.append(outcome)
            done[spec.name] = artifact
        return outcomes

    def _build(self, spec: StageSpec, key: str, inputs: Mapping[str, Artifact]) -> Artifact:
        stage_dir = self.ctx.cache_root / spec.name
        stage_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(stage_dir)
        tmp = stage_dir / f".tmp-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        sctx = StageContext(run=self.ctx, stage=spec.name, out_dir=tmp, key=key)
        t0 = time.perf_counter()
        try:
            with StagePeak() as peak:
                produced = spec.run(spec.config, *[inputs[i] for i in spec.inputs], ctx=sctx)
            seconds = time.perf_counter() - t0
            disk = disk_usage_mb(tmp)
            manifest = write_manifest(
                tmp,
                {
                    "stage": spec.name,
                    "key": key,
                    "config": spec.config_json(),
                    "key_extra": dict(spec.key_extra),
                    "inputs": {n: {"digest": a.digest, "path": str(a.path)} for n, a in inputs.items()},
                    "code_version": self.ctx.code_version,
                    "seconds": round(seconds, 3),
                    # what building it cost: this process's peak during the stage, its children's, and disk
                    "resources": {**peak.result, CHILD_PEAK_KEY: produced.meta.get(CHILD_PEAK_KEY),
                                  "disk_written_mb": round(disk["written"], 2),
                                  "disk_linked_mb": round(disk["linked"], 2)},
                    "created_unix": time.time(),
                    "meta": dict(produced.meta),
                },
            )
            final = publish_dir(tmp, self._final_dir(spec, key))
        except KilnError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            log = self.ctx.settings.artifacts_root / "logs" / f"{spec.name}-{key}-{int(time.time())}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("".join(traceback.format_exception(e)))
            detail = "".join(traceback.format_exception_only(type(e), e)).strip()
            raise StageFailed(spec.name, f"{detail} (full traceback: {log})") from e
        manifest = read_manifest(final) if final.exists() else manifest
        return replace(produced, path=final, digest=manifest["digest"], meta=manifest["meta"])
