"""Every environment variable Kiln reads is read here, once, and passed down explicitly."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    artifacts_root: Path
    tracking_uri_override: str | None
    hf_offline: bool

    @classmethod
    def from_env(cls, artifacts_root: str | Path | None = None) -> "Settings":
        root = artifacts_root or os.environ.get("KILN_ARTIFACTS") or "artifacts"
        return cls(
            artifacts_root=Path(root).resolve(),
            tracking_uri_override=os.environ.get("MLFLOW_TRACKING_URI") or None,
            hf_offline=os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"},
        )

    def default_tracking_uri(self) -> str:
        """The embedded store: a sqlite file beside the artifacts (absolute, so cwd does not matter)."""
        return f"sqlite:///{self.artifacts_root / 'mlflow.db'}"

    def tracking_uri(self, recipe_uri: str | None) -> str:
        """Recipe wins over MLFLOW_TRACKING_URI, which wins over the embedded default."""
        return recipe_uri or self.tracking_uri_override or self.default_tracking_uri()
