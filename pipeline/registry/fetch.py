"""A registered version's artifacts, downloaded from its store and checked before anything uses them.

The engine comes from the version's own source URI (what `models:/NAME@alias` resolves to); the
validation report from the version's run. Each folder must match the sha256 manifest logged inside
it, and that manifest's digest must equal the one recorded at registration (`kiln.engine_sha256`,
`kiln.stage_digests`), so neither a changed file nor a swapped folder with a fresh manifest passes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import verify
from pipeline.errors import IntegrityError

# Run tag naming the package's folder that holds the engine's files: the store keeps those once,
# with the engine, and `fetch_triton_repository` puts them back there before verifying the package.
PACKAGE_ENGINE_TAG = "kiln.triton_engine_dir"
# Where the engine and the Triton package are inside a version's MLflow model (its source URI).
MODEL_PARTS = {"engine": "artifacts/engine", "triton": "artifacts/triton"}
# Run tag of versions whose MLflow model was logged as the run's `model/` artifacts (before it became
# a LoggedModel); versions older still have no MLflow model: the run's `engine/` and `triton/`.
ARTIFACT_PATHS_TAG = "kiln.artifact_paths"


@dataclass(frozen=True)
class FetchedVersion:
    name: str
    version: str
    engine_dir: Path
    validation_dir: Path


def run_tags(client, mv) -> tuple[dict[str, str], dict[str, str]]:
    """The version's run tags, and the stage digests recorded among them at registration."""
    tags = client.get_run(mv.run_id).data.tags
    return tags, json.loads(tags.get("kiln.stage_digests", "{}"))


def part_uri(client, mv, tags: dict[str, str], part: str) -> str:
    """The artifact URI of one part ("engine", "triton") of a version, whichever layout it was
    registered with."""
    if mv.source.startswith("models:/") or ARTIFACT_PATHS_TAG in tags:
        return f"{client.get_model_version_download_uri(mv.name, mv.version)}/{MODEL_PARTS[part]}"
    return f"runs:/{mv.run_id}/{part}"


def engine_of(downloaded: Path) -> Path:
    """The engine folder inside what a version's source URI downloads to: the MLflow model's
    `artifacts/engine`, or (versions registered before the model) the folder itself."""
    return downloaded / "artifacts" / "engine" if (downloaded / "MLmodel").is_file() else downloaded


def expected_digests(client, mv) -> dict[str, str]:
    _, stage_digests = run_tags(client, mv)
    engine = mv.tags.get("kiln.engine_sha256") or stage_digests.get("build")
    if not engine or "validate" not in stage_digests:
        raise IntegrityError(f"{mv.name} version {mv.version} was not registered by Kiln (no recorded artifact digests)")
    return {"engine": engine, "validation": stage_digests["validate"]}


def check_folder(folder: Path, expected_digest: str, what: str) -> None:
    manifest = verify(folder, full=True)
    if manifest["digest"] != expected_digest:
        raise IntegrityError(f"{what}: manifest digest {manifest['digest'][:16]}… is not the registered {expected_digest[:16]}…")


def fetch_validation(client, tracking_uri: str, mv, dst: Path) -> Path:
    """The version's validation folder downloaded under `dst`, after it matched its registered digest."""
    import mlflow.artifacts

    folder = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="validation", dst_path=str(dst),
                                                      tracking_uri=tracking_uri))
    check_folder(folder, expected_digests(client, mv)["validation"], f"{mv.name} version {mv.version} validation")
    return folder


def fetch_version(client, tracking_uri: str, mv, dest: Path, reuse: bool = True) -> FetchedVersion:
    """Download into `dest` (replaced only after the new copy verifies) and verify; with `reuse`, a
    copy already at `dest` that verifies is used as it is."""
    import mlflow.artifacts

    expected = expected_digests(client, mv)
    done = FetchedVersion(mv.name, str(mv.version), dest / "engine", dest / "validation")
    if reuse and dest.is_dir():
        try:
            check_folder(done.engine_dir, expected["engine"], "engine")
            check_folder(done.validation_dir, expected["validation"], "validation")
            return done
        except (IntegrityError, OSError):
            pass  # stale or damaged: download again
    partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        source = Path(mlflow.artifacts.download_artifacts(artifact_uri=client.get_model_version_download_uri(mv.name, mv.version),
                                                          dst_path=str(partial / "source"), tracking_uri=tracking_uri))
        engine_of(source).rename(partial / "engine")
        shutil.rmtree(partial / "source")
        check_folder(partial / "engine", expected["engine"], f"{mv.name} version {mv.version} engine")
        fetch_validation(client, tracking_uri, mv, partial)
        shutil.rmtree(dest, ignore_errors=True)
        partial.rename(dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return done


def has_package(client, mv) -> bool:
    """Whether the version was registered with a Triton package (its recipe had a `package` section)."""
    return "package" in run_tags(client, mv)[1]


def fetch_triton_repository(client, tracking_uri: str, mv, dest: Path) -> Path:
    """The version's Triton package (the `package` stage folder, logged as `triton/`), downloaded
    and verified against the digest recorded at registration; returns its model repository."""
    import mlflow.artifacts

    from pipeline.errors import RegistryError

    tags, digests = run_tags(client, mv)
    if "package" not in digests:
        raise RegistryError(f"{mv.name} version {mv.version} has no Triton package: its recipe had no `package` section")
    if dest.is_dir():
        try:
            check_folder(dest, digests["package"], "triton package")
            return dest / "model_repository"
        except (IntegrityError, OSError):
            shutil.rmtree(dest)
    partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        package = Path(mlflow.artifacts.download_artifacts(artifact_uri=part_uri(client, mv, tags, "triton"),
                                                           dst_path=str(partial / "package"), tracking_uri=tracking_uri))
        engine_dir = tags.get(PACKAGE_ENGINE_TAG)
        if engine_dir:  # the store keeps the engine's files once, with the engine
            engine = Path(mlflow.artifacts.download_artifacts(artifact_uri=part_uri(client, mv, tags, "engine"),
                                                              dst_path=str(partial / "engine-files"), tracking_uri=tracking_uri))
            (engine / "manifest.json").unlink(missing_ok=True)  # the package's copy never had the build's manifest
            engine.rename(package / engine_dir)
        check_folder(package, digests["package"], f"{mv.name} version {mv.version} triton package")
        package.rename(dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return dest / "model_repository"
