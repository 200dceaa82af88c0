"""source: resolve the checkpoint into an ordinary, safe HF folder (`model/`) with its tokenizer.

Accepts a local HF folder (safetensors only), a GGUF file as llama.cpp writes it
(read and dequantized by pipeline/modeling/gguf_checkpoint.py), a
hub id (when online), or a random model of a supported family for tests. `source.dtype` decides the
precision of the written checkpoint (`auto`: a folder's own; float32 for GGUF and random models).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

from pipeline.artifacts import SourceCheckpoint
from pipeline.errors import RecipeError
from pipeline.hashing import sha256_file
from pipeline.modeling.decoder import UnsupportedModel, spec_from_folder
from pipeline.modeling.gguf_checkpoint import gguf_to_checkpoint
from pipeline.modeling.hf import (
    CHECKPOINT_PATTERNS,
    SourceError,
    check_config,
    check_safetensors_only,
    checkpoint_dtype,
    convert_checkpoint,
    copy_checkpoint,
    load_tokenizer,
    make_random_model,
    read_config,
)
from pipeline.recipe import SourceConfig
from pipeline.runner import StageContext

PKG_SCHEME = "pkg://"
HUB_PATTERNS = list(CHECKPOINT_PATTERNS)


def resolve_path(path: str) -> Path:
    """A filesystem path, or `pkg://PACKAGE/FILE` for a file shipped inside an installed package."""
    if path.startswith(PKG_SCHEME):
        package, _, rel = path[len(PKG_SCHEME) :].partition("/")
        spec = importlib.util.find_spec(package) if package else None
        if spec is None or not spec.submodule_search_locations:
            dist = package.replace("_", "-")
            raise RecipeError(
                [f"source.path: {path!r}: package '{package}' is not installed (pip install --no-deps {dist})"]
            )
        resolved = Path(list(spec.submodule_search_locations)[0]) / rel
    else:
        resolved = Path(path).expanduser()
    if not resolved.exists():
        raise RecipeError([f"source.path: {path!r} does not exist ({resolved})"])
    return resolved.resolve()


def origin_fingerprint(cfg: SourceConfig) -> dict[str, Any]:
    """What identifies the origin's content cheaply, for the cache key: a changed file at the same
    path (new size or mtime) rebuilds the source stage."""
    if cfg.path is not None:
        p = resolve_path(cfg.path)
        files = [p] if p.is_file() else sorted(f for pat in CHECKPOINT_PATTERNS for f in p.glob(pat))
        return {
            "resolved": str(p),
            "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        }
    if cfg.hub_id is not None:
        return {"hub_id": cfg.hub_id, "revision": cfg.revision or "main"}
    return {}


def _download(cfg: SourceConfig, dest: Path, offline: bool) -> dict[str, Any]:
    hint = "download the checkpoint on a connected machine and set source.path to the folder"
    if offline:
        raise SourceError(f"source.hub_id {cfg.hub_id!r}: HF_HUB_OFFLINE is set; {hint}")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            repo_id=cfg.hub_id, revision=cfg.revision, allow_patterns=HUB_PATTERNS, local_dir=dest / "download"
        )
    except Exception as e:  # network errors come in many types; all mean the same to the user
        raise SourceError(
            f"source.hub_id {cfg.hub_id!r}: could not fetch from the Hugging Face hub "
            f"({type(e).__name__}: {str(e)[:300]}); this machine may be offline: {hint}"
        ) from None
    return {"kind": "hub", "hub_id": cfg.hub_id, "revision": cfg.revision or "main", "local": local}


def place_checkpoint(src: Path, dst: Path, dtype: str, log) -> None:
    """Copy a checkpoint folder as it is, or cast to the recipe's `source.dtype` shard by shard."""
    own = checkpoint_dtype(src)
    if dtype in ("auto", own):
        copy_checkpoint(src, dst)
    else:
        log(f"casting the {own} checkpoint to {dtype} (source.dtype)")
        convert_checkpoint(src, dst, dtype)


def run(cfg: SourceConfig, *, ctx: StageContext) -> SourceCheckpoint:
    model_dir = ctx.out_dir / "model"
    origin: dict[str, Any]
    written_dtype = "float32" if cfg.dtype == "auto" else cfg.dtype  # for what Kiln writes itself
    if cfg.random_model is not None:
        ctx.log(f"writing a random {cfg.random_model.family} model ({written_dtype}) with a byte-level tokenizer")
        make_random_model(cfg.random_model, model_dir, written_dtype)
        origin = {"kind": "random_model", **cfg.random_model.model_dump()}
    elif cfg.hub_id is not None:
        origin = _download(cfg, ctx.out_dir, ctx.run.settings.hf_offline)
        download = Path(origin.pop("local"))
        check_safetensors_only(download)
        place_checkpoint(download, model_dir, cfg.dtype, ctx.log)
        shutil.rmtree(ctx.out_dir / "download")  # only the copied safe files stay in the artifact
    else:
        path = resolve_path(cfg.path)
        if path.is_file() and path.suffix == ".gguf":
            ctx.log(f"dequantizing GGUF {path.name} to a {written_dtype} safetensors checkpoint")
            gguf_to_checkpoint(path, model_dir, written_dtype)
            origin = {"kind": "gguf", "path": str(path), "sha256": sha256_file(path)}
        elif path.is_dir():
            check_safetensors_only(path)
            check_config(read_config(path))
            place_checkpoint(path, model_dir, cfg.dtype, ctx.log)
            origin = {"kind": "hf_folder", "path": str(path)}
        else:
            raise SourceError(f"source.path {cfg.path!r} is neither a checkpoint folder nor a .gguf file")

    remote_code = check_config(read_config(model_dir))
    if remote_code:
        ctx.log(f"config.json names its own modelling code ({'; '.join(remote_code)}); Kiln never runs it: "
                "transformers' stock class is the reference every check compares against")
        origin["remote_code_ignored"] = remote_code
    check_safetensors_only(model_dir)
    try:  # the description every later stage reads: a config Kiln cannot describe fails here
        spec = spec_from_folder(model_dir)
    except UnsupportedModel as e:
        raise SourceError(str(e)) from None
    tokenizer = load_tokenizer(model_dir)  # fail here, not in validation, if the tokenizer is broken
    dtype = checkpoint_dtype(model_dir)
    ctx.log(f"{spec.architecture}: {spec.num_layers} layers, hidden {spec.hidden_size}, vocab {len(tokenizer)}, {dtype}")
    return SourceCheckpoint(
        path=ctx.out_dir,
        meta={"origin": origin, "architecture": spec.architecture, "model_type": spec.model_type, "dtype": dtype},
    )

