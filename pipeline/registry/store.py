"""An MLflow client for one store, and the idempotent creation of what registration needs."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from pipeline.errors import KilnError, RegistryError, StoreAccessDenied
from pipeline.locking import file_lock

SQLITE_PREFIX = "sqlite:///"


@contextlib.contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """Serialises writers of one embedded sqlite store across processes. Measured: two `kiln run`s
    registering into a new store at once failed with "table latest_metrics already exists" (both
    created MLflow's schema). A tracking server serialises its own writes, so it needs no lock."""
    if not tracking_uri.startswith(SQLITE_PREFIX):
        yield
        return
    db = Path(tracking_uri[len(SQLITE_PREFIX):])
    with file_lock(db.with_name(db.name + ".kiln-lock")):
        yield


class StoreMoved(KilnError):
    """An embedded store whose recorded artifact locations are in another folder: it was copied or
    moved, and writing or verifying through it would touch the original's files."""

    exit_code = 6


def client_for(tracking_uri: str):
    import logging

    from mlflow import MlflowClient

    # "Creating initial MLflow database tables..." / "Updating database tables" at INFO on a new
    # store: MLflow's bookkeeping, not something a Kiln user acts on
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    # tqdm bars while MLflow copies artifacts (registering, fetching): Kiln prints its own progress
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if tracking_uri.startswith(SQLITE_PREFIX):
        check_not_moved(client, Path(tracking_uri[len(SQLITE_PREFIX):]))
    return client


@contextlib.contextmanager
def global_tracking_uri(tracking_uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI (its environment variable; Kiln never calls
    `mlflow.set_tracking_uri`) names this store for the block, then is put back. MLflow's sqlite
    registry resolves a `models:/<model_id>` version source through the global URI, not the
    client's, and would look in (and create) ./mlflow.db instead."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


def check_not_moved(client, db: Path) -> None:
    """MLflow records absolute `file://` artifact locations in the database. An embedded store whose
    experiments point outside its own folder is refused, naming where they point, rather than
    registering into, reading from or promoting the original's files."""
    if not db.is_file():
        return  # a new store: MLflow creates it where it is
    home = db.resolve().parent
    for exp in client.search_experiments():
        location = exp.artifact_location or ""
        if not location.startswith("file://"):
            continue
        path = Path(location.removeprefix("file://"))
        if home not in (path, *path.parents):
            raise StoreMoved(f"the MLflow store {db} was copied or moved: its experiment {exp.name!r} keeps artifacts in "
                             f"{path}, outside {home}. Kiln will not write to or verify the original's files through it: "
                             f"use the store in its original folder ({path.parent}), or start a fresh artifacts folder "
                             "(the cache of built stages can be copied on its own, without mlflow.db and mlruns/)")


# MLflow 3's UI shows an experiment as a GenAI one (traces dashboard, "Evaluation run") unless this
# tag says otherwise; Kiln's runs build and register models, which the UI calls "model training".
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(client, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            exp = client.get_experiment(client.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_KIND))
        except MlflowException:  # created concurrently by another run
            exp = client.get_experiment_by_name(name)
    for key, value in EXPERIMENT_KIND.items():
        if exp.tags.get(key) != value:  # an experiment made by an earlier Kiln, or by hand
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="Built by Kiln")
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise


def unreachable(error: BaseException) -> RegistryError | None:
    """A store that does not answer (refused connection, unknown host, timeout) as a Kiln error, or
    None for anything else. MLflow's REST client raises MlflowException wrapping requests' error."""
    import requests

    text = str(error)
    if isinstance(error, requests.exceptions.ConnectionError) or (
            type(error).__name__ == "MlflowException" and ("Max retries exceeded" in text or "Failed to establish" in text)):
        where = text.split(" with url:")[0].removeprefix("API request to ")[:200]
        return RegistryError(f"the MLflow store does not answer ({where}): is the server running, and is MLFLOW_TRACKING_URI "
                             "(or --tracking-uri) its address?")
    return None


def access_denied(error: BaseException) -> StoreAccessDenied | None:
    """A tracking server's refusal as a Kiln error naming the identity, or None for anything else.
    MLflow's REST client raises MlflowException (PERMISSION_DENIED, UNAUTHENTICATED); its proxied
    artifact uploads raise requests' HTTPError (401, 403)."""
    import os

    code = getattr(error, "error_code", None)
    status = getattr(getattr(error, "response", None), "status_code", None)
    if code not in ("PERMISSION_DENIED", "UNAUTHENTICATED") and status not in (401, 403):
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    who = f"user {user!r}" if user else "no user (MLFLOW_TRACKING_USERNAME is not set)"
    what = "authenticate" if code == "UNAUTHENTICATED" or status == 401 else "allow this change for"
    return StoreAccessDenied(f"the MLflow server did not {what} {who}: {str(error).splitlines()[0][:300]}. In the team "
                             "set-up (docs/deploy.md) only the CI identity may register and move aliases; people have read access")
