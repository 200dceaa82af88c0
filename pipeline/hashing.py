"""Content hashing: files, folders and JSON-able configs. Every cache key and manifest uses these."""

from __future__ import annotations

import functools
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


PACKAGE_ROOT = Path(__file__).resolve().parent


def _module_file(module: str) -> Path | None:
    """The source file of a `pipeline.*` module (a package's `__init__.py`), or None."""
    parts = module.split(".")[1:]
    if not parts:
        return PACKAGE_ROOT / "__init__.py"
    rel = Path(*parts)
    for candidate in (PACKAGE_ROOT / rel.with_suffix(".py"), PACKAGE_ROOT / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@functools.lru_cache(maxsize=None)
def _imported_modules(path: Path, module: str) -> frozenset[str]:
    """Every `pipeline.*` module a file imports anywhere (function-level imports are code it runs
    too). Parent packages' `__init__.py` files that Python runs on the way are not followed: they are
    registries (`pipeline/stages/__init__.py` lists every stage), not code the importing stage runs."""
    import ast

    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # `from pipeline.x import submodule`
    return frozenset(name for name in names if name.split(".")[0] == "pipeline" and _module_file(name) is not None)


def module_closure(module: str) -> list[Path]:
    """The source files of `module` and every `pipeline.*` module it imports, transitively."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen or _module_file(name) is None:
            continue
        seen.add(name)
        todo.extend(_imported_modules(_module_file(name), name) - seen)
    return sorted(_module_file(name) for name in seen)


def code_digest(module: str) -> str:
    """What a stage's cache key uses for its code: a digest of its module's own import closure inside
    `pipeline/` (plus the package version), so an edit elsewhere (the CLI, serving) rebuilds nothing.
    A module that copies source files instead of importing them names them in `CODE_FILES`."""
    import importlib

    from pipeline import __version__

    extra = [PACKAGE_ROOT / rel for rel in getattr(importlib.import_module(module), "CODE_FILES", ())]
    h = hashlib.sha256()
    for p in sorted(set(module_closure(module)) | set(extra)):
        h.update(p.relative_to(PACKAGE_ROOT).as_posix().encode())
        h.update(p.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"
