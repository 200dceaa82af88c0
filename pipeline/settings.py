"""Every environment variable Kiln reads is read here, once, and passed down explicitly."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def login_name() -> str:
    import getpass

    try:
        return getpass.getuser()  # $LOGNAME/$USER, else the password database
    except (KeyError, OSError):
        return "unknown"


def actor_from_env() -> str:
    """The identity a tracking server authenticated (MLFLOW_TRACKING_USERNAME), and the person a CI
    job acts for (GITHUB_ACTOR); else the login user."""
    user, person = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("GITHUB_ACTOR")
    if user and person and user != person:
        return f"{user} (for {person})"
    return user or person or login_name()


@dataclass(frozen=True)
class Settings:
    artifacts_root: Path
    tracking_uri_override: str | None
    hf_offline: bool
    actor: str  # who promotions and rollbacks are recorded as (see `actor_from_env`)
    step_summary: Path | None = None  # GitHub Actions' job summary file, for `kiln run --ci`

    @classmethod
    def from_env(cls, artifacts_root: str | Path | None = None) -> "Settings":
        root = artifacts_root or os.environ.get("KILN_ARTIFACTS") or "artifacts"
        return cls(
            artifacts_root=Path(root).resolve(),
            tracking_uri_override=os.environ.get("MLFLOW_TRACKING_URI") or None,
            hf_offline=os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"},
            actor=actor_from_env(),
            step_summary=Path(os.environ["GITHUB_STEP_SUMMARY"]) if os.environ.get("GITHUB_STEP_SUMMARY") else None,
        )

    def default_tracking_uri(self) -> str:
        """The embedded store: a sqlite file beside the artifacts (absolute, so cwd does not matter)."""
        return f"sqlite:///{self.artifacts_root / 'mlflow.db'}"

    @staticmethod
    def artifact_location(tracking_uri: str) -> str | None:
        """Where a new experiment keeps its artifacts. For a sqlite store: `mlruns/` beside the
        database (MLflow's own default is ./mlruns in whatever directory `kiln` runs from). For a
        tracking server: None, so the server's own artifact root applies."""
        prefix = "sqlite:///"
        if tracking_uri.startswith(prefix):
            return (Path(tracking_uri[len(prefix):]).parent / "mlruns").as_uri()
        return None

    def tracking_uri(self, recipe_uri: str | None) -> str:
        """Recipe wins over MLFLOW_TRACKING_URI, which wins over the embedded default."""
        return recipe_uri or self.tracking_uri_override or self.default_tracking_uri()
