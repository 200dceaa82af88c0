"""Content hashing: files, folders and JSON-able configs. Every cache key and manifest uses these."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_json(obj: Any) -> str:
    return sha256_bytes(canonical_json(obj).encode())


def hash_tree(root: Path, exclude: frozenset[str] = frozenset()) -> dict[str, str]:
    """sha256 of every file below `root`, keyed by POSIX relative path, sorted."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    out: dict[str, str] = {}
    for p in files:
        rel = p.relative_to(root).as_posix()
        if rel in exclude:
            continue
        out[rel] = sha256_file(p)
    return out


def code_version() -> str:
    """Package version plus a digest of the package's own source, so a code change invalidates caches."""
    from pipeline import __version__

    pkg = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(pkg.rglob("*.py")):
        h.update(p.relative_to(pkg).as_posix().encode())
        h.update(p.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"
