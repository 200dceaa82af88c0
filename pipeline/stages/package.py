"""package: a Triton Inference Server model repository for the built engine.

    model_repository/NAME/config.pbtxt         Python backend, decoupled (streams tokens), inputs/outputs
    model_repository/NAME/1/model.py           pipeline/serving/triton_model.py
    model_repository/NAME/1/kiln_runtime.py    pipeline/modeling/runtime.py (the engine's decode loop)
    model_repository/NAME/1/kiln_generation.py pipeline/serving/generation.py (checks, sampling, batching)
    model_repository/NAME/1/kiln_manifest.py   pipeline/serving/manifest_check.py (the sha256 check)
    model_repository/NAME/1/engine/...         the engine folder (graph, session options, tokenizer)
    model_repository/NAME/1/serving.json       limits, EOS ids, batch size
    model_repository/NAME/1/manifest.json      sha256 of every file above; model.py refuses to load otherwise

The model code needs numpy, onnxruntime and tokenizers only (`kiln serve` provides that
environment). The repository is a standard one: `tritonserver --model-repository=...` serves it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.artifacts import Engine, TritonRepository, link_tree, package_engine_dir, write_json_atomic, write_manifest
from pipeline.errors import StageFailed
from pipeline.modeling import runtime
from pipeline.recipe import PackageConfig
from pipeline.runner import StageContext
from pipeline.serving import generation, manifest_check

# Copied into the package as files (not imported here): part of this stage's code for its cache key.
CODE_FILES = ("serving/triton_model.py",)

INPUTS = [  # name, Triton type, dims, optional
    ("text_input", "TYPE_STRING", "[ 1 ]", False),
    ("max_tokens", "TYPE_INT32", "[ 1 ]", True),
    ("temperature", "TYPE_FP32", "[ 1 ]", True),
    ("top_k", "TYPE_INT32", "[ 1 ]", True),
    ("top_p", "TYPE_FP32", "[ 1 ]", True),
    ("seed", "TYPE_UINT64", "[ 1 ]", True),
    ("stop", "TYPE_STRING", "[ -1 ]", True),
    ("stream", "TYPE_BOOL", "[ 1 ]", True),
]


OUTPUTS = [  # text in every response; the final response also says why it ended and how many tokens
    ("text_output", "TYPE_STRING"),
    ("finish_reason", "TYPE_STRING"),
    ("prompt_tokens", "TYPE_INT32"),
    ("completion_tokens", "TYPE_INT32"),
]


def config_pbtxt(name: str, cfg: PackageConfig) -> str:
    inputs = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: {d}{" optional: true" if o else ""} }}' for n, t, d, o in INPUTS)
    outputs = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ 1 ] }}' for n, t in OUTPUTS)
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
            "model_transaction_policy { decoupled: true }\n"
            f"input [\n{inputs}\n]\n"
            f"output [\n{outputs}\n]\n"
            f"instance_group [ {{ kind: KIND_CPU count: {cfg.instances} }} ]\n")


def eos_token_ids(engine_dir: Path) -> list[int]:
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = engine_dir / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return sorted(ids)


def context_limit(engine: Engine) -> int:
    opts = engine.meta["session_options"]
    if opts.get("graph") == "fused":
        return int(opts["max_sequence_length"])
    return int(json.loads((engine.path / "config.json").read_text()).get("max_position_embeddings", 2048))


def request_limits(engine: Engine, cfg: PackageConfig) -> dict:
    """What a request may ask of this engine: the Triton model's and the MLflow model's limits."""
    return {"context_limit": context_limit(engine), "max_tokens_cap": cfg.max_tokens_cap, "default_max_tokens": cfg.default_max_tokens}


def run(cfg: PackageConfig, engine: Engine, *, ctx: StageContext) -> TritonRepository:
    if engine.target != "onnxruntime-cpu":
        raise StageFailed("package", f"the Triton package drives onnxruntime-cpu engines; this engine is {engine.target}")
    engine_dir = ctx.out_dir / package_engine_dir(cfg.model_name)
    version_dir = engine_dir.parent
    model_dir = version_dir.parent
    version_dir.mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(config_pbtxt(cfg.model_name, cfg))
    # triton_model.py imports Triton's own module, so it is copied as a file, never imported here
    shutil.copy2(Path(generation.__file__).parent.parent / CODE_FILES[0], version_dir / "model.py")
    shutil.copy2(runtime.__file__, version_dir / "kiln_runtime.py")
    shutil.copy2(generation.__file__, version_dir / "kiln_generation.py")
    shutil.copy2(manifest_check.__file__, version_dir / "kiln_manifest.py")
    # The engine's bytes are written once: hard links to the build entry (both are sha256-manifested
    # and immutable once written), a copy only across filesystems.
    link_tree(engine.path, engine_dir, ignore=shutil.ignore_patterns("manifest.json"))
    limits = request_limits(engine, cfg)
    eos = eos_token_ids(engine.path)
    write_json_atomic(version_dir / "serving.json", {
        "session_options": {**engine.meta["session_options"], "model_file": engine.meta["model_file"]},
        "limits": limits, "eos_token_ids": eos, "max_batch": cfg.max_batch, "max_queue": cfg.max_queue,
    })
    write_manifest(version_dir, {"engine_digest": engine.digest})
    ctx.log(f"Triton model {cfg.model_name!r}: Python backend, decoupled, {cfg.instances} instance(s), in-flight batches of up to "
            f"{cfg.max_batch} ({cfg.max_queue} more queued), context {limits['context_limit']} tokens, EOS ids {eos}")
    return TritonRepository(path=ctx.out_dir, meta={"model_name": cfg.model_name, "limits": limits, "eos_token_ids": eos,
                                                         "max_batch": cfg.max_batch})
