"""Names for registered model versions, as users type them and as MLflow's `models:/` URIs spell them.

    smollm2-135m-int4            the newest version
    smollm2-135m-int4/3          version 3
    smollm2-135m-int4@production the version the alias points to
    models:/smollm2-135m-int4@production   (the same, as an MLflow URI)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.errors import RegistryError

_REF = re.compile(r"^(?:models:/)?(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_-]+))?/?$")


@dataclass(frozen=True)
class VersionRef:
    name: str
    version: str | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, text: str) -> "VersionRef":
        m = _REF.match(text.strip())
        if not m:
            raise RegistryError(f"{text!r} is not a model reference; use NAME, NAME/VERSION, NAME@ALIAS or models:/NAME@ALIAS")
        return cls(m["name"], m["version"], m["alias"])

    @property
    def uri(self) -> str:
        return f"models:/{self.name}" + (f"/{self.version}" if self.version else f"@{self.alias}" if self.alias else "")

    def __str__(self) -> str:
        return self.uri.removeprefix("models:/")


def resolve(client, ref: VersionRef):
    """The ModelVersion a reference names; RegistryError naming what exists when it names nothing."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(ref.name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models())
        raise RegistryError(f"no registered model {ref.name!r}; the store has: {', '.join(names) or 'none'}") from None
    try:
        if ref.alias:
            return client.get_model_version_by_alias(ref.name, ref.alias)
        if ref.version:
            return client.get_model_version(ref.name, ref.version)
    except MlflowException:
        aliases = ", ".join(f"@{a}" for a in sorted(model.aliases or {})) or "none"
        what = f"alias @{ref.alias}" if ref.alias else f"version {ref.version}"
        hint = (f"; point it at a version with: kiln promote {ref.name} VERSION --to {ref.alias}"
                if ref.alias in ("staging", "production") else "")
        raise RegistryError(f"{ref.name} has no {what} (aliases: {aliases}){hint}") from None
    versions = client.search_model_versions(f"name='{ref.name}'")
    if not versions:
        raise RegistryError(f"{ref.name} has no versions")
    return max(versions, key=lambda v: int(v.version))
