"""The sha256 manifest check for runtimes that have no Kiln installed: the Triton model and the
MLflow pyfunc model copy this file beside their code (as `kiln_manifest.py`) and run it before they
load an engine. Standard library only; same digests as `pipeline.artifacts` (tested)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


class ManifestMismatch(RuntimeError):
    """A folder whose files differ from its manifest.json, or whose manifest is not the expected one."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def files_digest(files: dict) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def check_folder(folder: Path, expected_digest: str | None = None) -> dict:
    """Every file listed in `folder/manifest.json` present with its sha256, and (when given) the
    manifest's digest equal to `expected_digest`; returns the manifest or raises ManifestMismatch."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        listed = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ManifestMismatch(f"{folder} has no readable manifest.json ({e})") from None
    problems = []
    for rel, expected in sorted(listed.items()):
        path = folder / rel
        if not path.is_file():
            problems.append(f"missing {rel}")
        elif file_sha256(path) != expected:
            problems.append(f"sha256 mismatch: {rel}")
    digest = files_digest(listed)
    if digest != manifest.get("digest"):
        problems.append("manifest digest does not match its file list")
    elif expected_digest is not None and digest != expected_digest:
        problems.append(f"manifest digest {digest[:16]}… is not the registered {expected_digest[:16]}…")
    if problems:
        raise ManifestMismatch(f"{folder} differs from its manifest: " + "; ".join(problems))
    return manifest
