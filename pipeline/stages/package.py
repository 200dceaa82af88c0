"""package: a Triton Inference Server model repository for the built engine.

    model_repository/NAME/config.pbtxt         Python backend, decoupled (streams tokens), inputs/outputs
    model_repository/NAME/1/model.py           pipeline/serving/triton_model.py
    model_repository/NAME/1/kiln_runtime.py    pipeline/modeling/runtime.py (the engine's forward)
    model_repository/NAME/1/kiln_engine/       pipeline/engine/ (request checks, sampling, scheduler, prefix cache)
    model_repository/NAME/1/kiln_manifest.py   pipeline/serving/manifest_check.py (the sha256 check)
    model_repository/NAME/1/kiln_tracing.py    pipeline/serving/tracing.py (OpenTelemetry, when `kiln serve --otlp-endpoint`)
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

from pipeline import engine as decode_engine
from pipeline.artifacts import Engine, TritonRepository, link_tree, package_engine_dir, write_json_atomic, write_manifest
from pipeline.draft_engine import checked_draft, draft_engine_folder, speculative_settings
from pipeline.modeling import runtime
from pipeline.recipe import PackageConfig
from pipeline.runner import StageContext
from pipeline.serving import manifest_check
from pipeline.targets import REQUIREMENTS

# Copied into the package as files (not imported here): part of this stage's code for its cache key.
CODE_FILES = ("serving/triton_model.py", "serving/tracing.py")

INPUTS = [  # name, Triton type, dims, optional
    ("text_input", "TYPE_STRING", "[ 1 ]", False),
    ("max_tokens", "TYPE_INT32", "[ 1 ]", True),
    ("temperature", "TYPE_FP32", "[ 1 ]", True),
    ("top_k", "TYPE_INT32", "[ 1 ]", True),
    ("top_p", "TYPE_FP32", "[ 1 ]", True),
    ("seed", "TYPE_UINT64", "[ 1 ]", True),
    ("stop", "TYPE_STRING", "[ -1 ]", True),
    ("stream", "TYPE_BOOL", "[ 1 ]", True),
    ("priority", "TYPE_INT32", "[ 1 ]", True),  # 0 critical, 1 standard (default), 2 batch: who waits, who is refused
    ("tenant", "TYPE_STRING", "[ 1 ]", True),  # tenants of one class take turns for rows
    ("speculative", "TYPE_BOOL", "[ 1 ]", True),  # false: this request decodes plainly (package.speculative on)
]


OUTPUTS = [  # text in every response; the final response also says why it ended and how many tokens
    ("text_output", "TYPE_STRING"),
    ("finish_reason", "TYPE_STRING"),
    ("prompt_tokens", "TYPE_INT32"),
    ("completion_tokens", "TYPE_INT32"),
    ("accepted_draft_tokens", "TYPE_INT32"),  # speculative decoding: drafted tokens kept, and
    ("rejected_draft_tokens", "TYPE_INT32"),  # drafted tokens verified and thrown away
]


def instance_kind(target: str) -> str:
    """Triton's instance kind for an engine target: GPU engines get KIND_GPU instances, one per
    `instances` on every visible GPU (Triton's default), each loading the engine on its own GPU."""
    return "KIND_GPU" if REQUIREMENTS[target].needs_nvidia_gpu else "KIND_CPU"


def config_pbtxt(name: str, cfg: PackageConfig, target: str = "onnxruntime-cpu") -> str:
    inputs = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: {d}{" optional: true" if o else ""} }}' for n, t, d, o in INPUTS)
    outputs = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ 1 ] }}' for n, t in OUTPUTS)
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
            "model_transaction_policy { decoupled: true }\n"
            f"input [\n{inputs}\n]\n"
            f"output [\n{outputs}\n]\n"
            f"instance_group [ {{ kind: {instance_kind(target)} count: {cfg.instances} }} ]\n")


def eos_token_ids(engine_dir: Path) -> list[int]:
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = engine_dir / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return sorted(ids)


def context_limit(engine: Engine) -> int:
    """Prompt + generated tokens the engine holds: its KV buffers (fused ONNX Runtime graph), its
    optimization profile (TensorRT), else the model's positions."""
    if engine.target == "tensorrt":
        return int(engine.meta["build_settings"]["max_sequence_length"])
    opts = engine.meta["session_options"]
    if opts.get("graph") == "fused":
        return int(opts["max_sequence_length"])
    return int(json.loads((engine.path / "config.json").read_text()).get("max_position_embeddings", 2048))


def request_limits(engine: Engine, cfg: PackageConfig) -> dict:
    """What a request may ask of this engine: the Triton model's and the MLflow model's limits."""
    from tokenizers import Tokenizer

    limit = context_limit(engine)
    limits = {"context_limit": limit, "max_tokens_cap": cfg.max_tokens_cap, "default_max_tokens": cfg.default_max_tokens,
              "max_prompt_chars": decode_engine.prompt_char_limit(Tokenizer.from_file(str(engine.path / "tokenizer.json")), limit)}
    if engine.target == "tensorrt":  # the whole prompt is one call: at most the profile's new-token maximum
        limits["max_prompt_tokens"] = int(engine.meta["build_settings"]["new_tokens"]["max"])
    return limits


def engine_options(engine: Engine) -> dict:
    """How the serving code loads the engine (`kiln_runtime.load_engine`): its target, its file and,
    for ONNX Runtime, the session options it was built with."""
    return {**engine.meta.get("session_options", {}), "model_file": engine.meta["model_file"], "target": engine.target}


def copy_engine_package(dest: Path) -> None:
    """pipeline/engine as the package `kiln_engine` (its .py files only)."""
    shutil.copytree(Path(decode_engine.__file__).parent, dest, ignore=lambda _d, names: [n for n in names if not n.endswith(".py")])


# A draft model's engine sits beside the engine: repository/model/version/draft
DRAFT_DIR = "draft"


def scheduler_settings(cfg: PackageConfig) -> dict:
    """The scheduler's options (`kiln_engine.Scheduler`) as serving.json and the MLflow model carry
    them; a draft engine as the package's copy (`DRAFT_DIR`, relative to the model version folder)."""
    speculative = speculative_settings(cfg.speculative)
    if speculative is not None and "draft_engine" in speculative:
        speculative["draft_engine"] = DRAFT_DIR
    return {"prefill_chunk": cfg.prefill_chunk, "prefix_cache_bytes": cfg.prefix_cache_mb << 20, "speculative": speculative}


def run(cfg: PackageConfig, engine: Engine, *, ctx: StageContext) -> TritonRepository:
    engine_dir = ctx.out_dir / package_engine_dir(cfg.model_name)
    version_dir = engine_dir.parent
    model_dir = version_dir.parent
    version_dir.mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(config_pbtxt(cfg.model_name, cfg, engine.target))
    # triton_model.py imports Triton's own module, so it is copied as a file, never imported here
    shutil.copy2(Path(manifest_check.__file__).parent.parent / CODE_FILES[0], version_dir / "model.py")
    shutil.copy2(runtime.__file__, version_dir / "kiln_runtime.py")
    copy_engine_package(version_dir / "kiln_engine")
    shutil.copy2(manifest_check.__file__, version_dir / "kiln_manifest.py")
    shutil.copy2(Path(manifest_check.__file__).parent.parent / CODE_FILES[1], version_dir / "kiln_tracing.py")
    # The engine's bytes are written once: hard links to the build entry (both are sha256-manifested
    # and immutable once written), a copy only across filesystems.
    link_tree(engine.path, engine_dir, ignore=shutil.ignore_patterns("manifest.json"))
    draft = draft_engine_folder(cfg.speculative)
    if draft is not None:  # with its own manifest: the MLflow model checks it against the digest in its settings
        draft_manifest = checked_draft(draft, engine.path / "tokenizer.json")
        link_tree(draft, version_dir / DRAFT_DIR)
        ctx.log(f"draft model: {draft} (digest {draft_manifest['digest'][:12]}), same vocabulary as the engine")
    limits = request_limits(engine, cfg)
    eos = eos_token_ids(engine.path)
    write_json_atomic(version_dir / "serving.json", {
        "session_options": engine_options(engine),
        "limits": limits, "eos_token_ids": eos, "max_batch": cfg.max_batch, "max_queue": cfg.max_queue,
        "scheduler": scheduler_settings(cfg),
    })
    write_manifest(version_dir, {"engine_digest": engine.digest})
    ctx.log(f"Triton model {cfg.model_name!r}: Python backend, decoupled, {cfg.instances} {instance_kind(engine.target)} "
            f"instance(s) running the {engine.target} engine, in-flight batches of up to "
            f"{cfg.max_batch} ({cfg.max_queue} more queued), context {limits['context_limit']} tokens, EOS ids {eos}")
    return TritonRepository(path=ctx.out_dir, meta={"model_name": cfg.model_name, "limits": limits, "eos_token_ids": eos,
                                                         "max_batch": cfg.max_batch, "scheduler": scheduler_settings(cfg)})
