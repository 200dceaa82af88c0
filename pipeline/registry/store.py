"""An MLflow client for one store, and the idempotent creation of what registration needs."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

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


def client_for(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def ensure_experiment(client, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:  # created concurrently by another run
        return client.get_experiment_by_name(name).experiment_id


def ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="Built by Kiln")
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
