"""Each registered version as a real MLflow model: a pyfunc model (`pipeline/serving/pyfunc_model.py`)
whose artifacts are the engine (with its sha256 manifest and tokenizer) and the Triton package, so
`mlflow.pyfunc.load_model("models:/NAME@alias")` and `mlflow models serve` generate text. It is
logged as an MLflow 3 LoggedModel of the version's run (the version's source is `models:/<model_id>`);
versions registered before that keep the same folder at their run's `model/`.

    model/MLmodel                    flavor, signature (prompt -> text, finish_reason, token counts; params)
    model/pyfunc_model.py            the model's code (models from code: nothing pickled)
    model/code/kiln_*.py             the engine's forward (kiln_runtime), the manifest check
    model/code/kiln_engine/          the decode engine: request checks, sampling, scheduler, prefix cache
    model/artifacts/engine/...       the build stage's folder, manifest.json included
    model/artifacts/triton/...       the Triton package, without the engine files engine/ holds
"""

from __future__ import annotations

import json
import logging
import shutil
from importlib import metadata
from pathlib import Path

from pipeline.artifacts import Artifact, link_tree
from pipeline.modeling import runtime
from pipeline.recipe import PackageConfig
from pipeline.serving import manifest_check

PYFUNC_FILE = Path(__file__).resolve().parent.parent / "serving" / "pyfunc_model.py"
SHIPPED_MODULES = {"kiln_runtime.py": runtime.__file__, "kiln_manifest.py": manifest_check.__file__}
EXAMPLE_PROMPT = "The Python programming language is"
RUNTIME_LIBRARIES = ("numpy", "pandas", "onnxruntime", "tokenizers")


def runtime_libraries(session_options: dict) -> tuple[str, ...]:
    """What the pyfunc model imports to run this engine: an engine whose prompts run on OpenVINO needs it too."""
    return RUNTIME_LIBRARIES + (("openvino",) if session_options.get("prefill_runtime") == "openvino" else ())


def signature(limits: dict):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "text"), ColSpec("string", "finish_reason"),
                        ColSpec("long", "prompt_tokens"), ColSpec("long", "completion_tokens")]),
        params=ParamSchema([
            ParamSpec("max_tokens", "long", int(limits["default_max_tokens"])),
            ParamSpec("temperature", "double", 0.0),  # 0: greedy
            ParamSpec("top_k", "long", 0),
            ParamSpec("top_p", "double", 1.0),
            ParamSpec("seed", "long", -1),  # -1: unseeded
            ParamSpec("stop", "string", [""], shape=(-1,)),
            ParamSpec("speculative", "boolean", True),  # false: no drafts for these prompts (package.speculative)
        ]),
    )


def serving_settings(engine: Artifact, package: Artifact | None) -> dict:
    """What the model needs besides the engine: limits, EOS ids and batch size, from the Triton
    package when there is one (one set of limits for both runtimes), else the package defaults."""
    from pipeline.stages.package import engine_options, eos_token_ids, request_limits, scheduler_settings

    if package is not None:
        limits, eos, max_batch = package.meta["limits"], package.meta["eos_token_ids"], int(package.meta["max_batch"])
        scheduler = package.meta.get("scheduler", scheduler_settings(PackageConfig()))
    else:
        cfg = PackageConfig()
        limits, eos, max_batch = request_limits(engine, cfg), eos_token_ids(engine.path), cfg.max_batch
        scheduler = scheduler_settings(cfg)
    settings = {"engine_digest": engine.digest, "limits": limits, "eos_token_ids": eos, "max_batch": max_batch,
                "scheduler": scheduler, "session_options": engine_options(engine)}
    speculative = scheduler.get("speculative") or {}
    if speculative.get("method") == "draft":  # the draft engine: in the Triton package, beside the engine
        settings["draft_dir"] = str(Path(package.engine_dir).parent / speculative["draft_engine"])
    return settings


def package_without_engine(package, view: Path) -> Path:
    """The Triton package's files, hard-linked, less the engine files the model's engine/ holds
    (the store keeps them once; `fetch_triton_repository` puts them back)."""
    link_tree(package.path, view)
    shutil.rmtree(view / package.engine_dir)
    return view


def save_engine_model(dest: Path, engine: Artifact, package: Artifact | None, scratch: Path, metadata_tags: dict,
                      run_id: str | None = None, model_id: str | None = None) -> Path:
    """Write the MLflow model folder for this build at `dest` (a new folder) and return it; its
    MLmodel names the run and the LoggedModel it is logged as, when given."""
    import mlflow.pyfunc
    from mlflow.models import Model

    from pipeline.stages.package import copy_engine_package

    settings = serving_settings(engine, package)
    libraries = runtime_libraries(settings["session_options"])
    if "draft_dir" in settings:  # the draft engine's own runtime too (its prompts may run on OpenVINO)
        draft_options = json.loads((package.path / settings["draft_dir"] / "session_options.json").read_text())["load"]
        libraries += runtime_libraries(draft_options)
    code = scratch / "code"
    code.mkdir(parents=True)
    for name, src in SHIPPED_MODULES.items():  # under the names the model's code imports
        shutil.copy2(src, code / name)
    copy_engine_package(code / "kiln_engine")
    # MLflow names an artifact's folder after its source folder: hard-linked views under the names
    # fetching expects (fetch.MODEL_PARTS)
    link_tree(engine.path, scratch / "engine")
    artifacts = {"engine": str(scratch / "engine")}
    if package is not None:
        artifacts["triton"] = str(package_without_engine(package, scratch / "triton"))
    # MLflow's INFO line about validating the input example is not something a Kiln user acts on
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    pyfunc_log.setLevel(logging.WARNING)
    try:
        mlflow.pyfunc.save_model(
            str(dest), python_model=str(PYFUNC_FILE), artifacts=artifacts,
            code_paths=[str(code / name) for name in [*SHIPPED_MODULES, "kiln_engine"]], model_config=settings,
            signature=signature(settings["limits"]),
            input_example=({"prompt": [EXAMPLE_PROMPT]}, {"max_tokens": 8}),
            pip_requirements=[f"{lib}=={metadata.version(lib)}" for lib in dict.fromkeys(libraries)],
            metadata=metadata_tags, mlflow_model=Model(run_id=run_id, model_id=model_id),
        )
    finally:
        pyfunc_log.setLevel(level)
    return dest
