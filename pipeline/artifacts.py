"""Typed artifact handles and the manifest every stage output carries.

An artifact is a folder `artifacts/cache/<stage>/<key>/` holding the stage's files and a
`manifest.json`: every file's sha256, the stage config, the input digests, tool versions and
timings. The folder appears only when complete (written under a temporary name, then renamed),
so its existence means it is whole; `verify()` re-hashes it before anything is served or promoted.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pipeline.errors import IntegrityError
from pipeline.hashing import hash_tree, sha256_file, sha256_json

MANIFEST = "manifest.json"


def link_or_copy(src: str, dst: str) -> None:
    """Hard-link a file (manifested artifacts are immutable once written, so sharing their bytes is
    safe); copy where links are impossible (another filesystem, or one without hard links)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_tree(src: Path, dst: Path, ignore=None) -> None:
    """`shutil.copytree` writing no bytes twice: every file linked, or copied where it cannot be."""
    shutil.copytree(src, dst, ignore=ignore, copy_function=link_or_copy)


@dataclass(frozen=True)
class Artifact:
    """A finished stage output. `digest` is the sha256 of its file listing (content only)."""

    path: Path
    digest: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    def file(self, rel: str) -> Path:
        return self.path / rel


@dataclass(frozen=True)
class SourceCheckpoint(Artifact):
    """An ordinary HF checkpoint folder: config.json, model.safetensors, tokenizer files."""

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def dtype(self) -> str:
        """The checkpoint's precision: what the PyTorch reference computes in."""
        from pipeline.modeling.hf import checkpoint_dtype

        return self.meta.get("dtype") or checkpoint_dtype(self.model_dir)


@dataclass(frozen=True)
class QuantizedWeights(Artifact):
    """Per quantized Linear: int codes, scales and zero points (`quantized.safetensors`), plus any
    float tensor the method changed (`float_overrides.safetensors`). Unchanged float weights stay
    in the source checkpoint; nothing is copied."""

    @property
    def tensors_file(self) -> Path:
        return self.path / "quantized.safetensors"

    @property
    def overrides_file(self) -> Path:
        """Float tensors the method changed outside the quantized layers (AWQ's rescaled norms)."""
        return self.path / "float_overrides.safetensors"


@dataclass(frozen=True)
class OnnxModel(Artifact):
    @property
    def model_file(self) -> Path:
        return self.path / "model.onnx"


@dataclass(frozen=True)
class Engine(Artifact):
    """A built engine for one target, with the files a runtime needs (tokenizer included)."""

    @property
    def model_file(self) -> Path:
        return self.path / self.meta["model_file"]

    @property
    def target(self) -> str:
        return self.meta["target"]


@dataclass(frozen=True)
class ValidationReport(Artifact):
    @property
    def passed(self) -> bool:
        return bool(self.meta["passed"])

    @property
    def metrics(self) -> Mapping[str, float]:
        return self.meta["metrics"]


@dataclass(frozen=True)
class TritonRepository(Artifact):
    """A Triton model repository (`model_repository/NAME/...`) for one engine."""

    @property
    def repository(self) -> Path:
        return self.path / "model_repository"

    @property
    def engine_dir(self) -> str:
        """Where, relative to the package, the engine's files sit (the build entry's, hard-linked)."""
        return package_engine_dir(self.meta["model_name"])


def package_engine_dir(model_name: str) -> str:
    """The engine's folder inside a Triton package (Triton's layout: repository/model/version/)."""
    return f"model_repository/{model_name}/1/engine"


@dataclass(frozen=True)
class Registration(Artifact):
    @property
    def model_name(self) -> str:
        return self.meta["model_name"]

    @property
    def version(self) -> str:
        return str(self.meta["version"])


def files_digest(files: Mapping[str, str]) -> str:
    return sha256_json(dict(files))


def write_manifest(folder: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in `folder` and write manifest.json beside them; returns the manifest."""
    files = hash_tree(folder, exclude=frozenset({MANIFEST}))
    manifest = {**record, "files": files, "digest": files_digest(files)}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    os.replace(tmp, folder / MANIFEST)
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text())


def verify(folder: Path, *, full: bool = True) -> dict[str, Any]:
    """Check the folder against its manifest: every listed file present, same size class, and
    (with `full`) same sha256; no unlisted files. Raises IntegrityError naming every mismatch."""
    manifest = read_manifest(folder)
    listed: dict[str, str] = manifest["files"]
    problems = []
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    present.discard(MANIFEST)
    for rel in sorted(set(listed) - present):
        problems.append(f"missing file {rel}")
    for rel in sorted(present - set(listed)):
        problems.append(f"unlisted file {rel}")
    if full:
        for rel in sorted(set(listed) & present):
            if sha256_file(folder / rel) != listed[rel]:
                problems.append(f"sha256 mismatch: {rel}")
    if files_digest(listed) != manifest["digest"]:
        problems.append("manifest digest does not match its file list")
    if problems:
        raise IntegrityError(f"{folder} fails its manifest: " + "; ".join(problems))
    return manifest


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def publish_dir(tmp_dir: Path, final_dir: Path) -> Path:
    """Rename a finished temp folder into place. If another run finished the same key first,
    keep theirs (same content by construction) and drop ours."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp_dir, final_dir)
    except OSError:
        if (final_dir / MANIFEST).is_file():
            shutil.rmtree(tmp_dir, ignore_errors=True)
        else:
            raise
    return final_dir

