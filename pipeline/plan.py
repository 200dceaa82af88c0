"""From a recipe to the list of stage specs the runner executes, and the static `check`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import yaml

from pipeline.artifacts import (
    Artifact,
    Engine,
    OnnxModel,
    QuantizedWeights,
    Registration,
    SourceCheckpoint,
    TritonRepository,
    ValidationReport,
)
from pipeline.corpus import text_fingerprint
from pipeline.draft_engine import check_against_source, draft_engine_folder, speculative_settings
from pipeline.errors import KilnError, MissingDependency, RecipeError
from pipeline.hashing import code_digest, sha256_bytes
from pipeline.modeling.decoder import (
    DecoderSpec,
    UnsupportedModel,
    check_positions,
    describe,
    spec_from_folder,
    spec_from_gguf,
    tiny_config,
)
from pipeline.modeling.shapes import group_size_problems
from pipeline.quantization import is_ignored
from pipeline.recipe import SOURCE_KINDS, Recipe
from pipeline.runner import RunContext, Runner, StageSpec
from pipeline.stages import STAGES, register, source, validate
from pipeline.targets import recipe_problems, unavailable_reason
from pipeline.task_eval import task_fingerprint, unknown_task_problems


def effective_recipe_text(recipe: Recipe) -> str:
    """The recipe as run (defaults and --set overrides applied): what is logged and hashed."""
    return yaml.safe_dump(recipe.to_yaml_dict(), sort_keys=False)


def source_spec(recipe: Recipe) -> DecoderSpec | None:
    """The decoder description from config.json, GGUF metadata or the random spec; None when
    unknown before running (hub ids). A checkpoint Kiln cannot describe is a recipe error naming
    `source.path` and the supported architectures."""
    src = recipe.source
    try:
        if src.random_model is not None:
            return describe(tiny_config(src.random_model.family, src.random_model.config_kwargs()))
        if src.path is None:
            return None
        path = source.resolve_path(src.path)
        if path.is_file() and path.suffix == ".gguf":
            return spec_from_gguf(path)
        if path.is_dir():
            return spec_from_folder(path)
        raise UnsupportedModel(f"{path} is neither a checkpoint folder nor a .gguf file")
    except UnsupportedModel as e:
        raise RecipeError([f"source.{'random_model' if src.random_model is not None else 'path'}: {e}"]) from None


def static_problems(recipe: Recipe) -> list[KilnError]:
    """Everything `kiln check` can tell without loading a model or touching a GPU."""
    problems: list[KilnError] = []
    try:
        spec = source_spec(recipe)
    except RecipeError as e:
        problems.append(e)
        spec = None
    q = recipe.quantize
    if spec is not None and q.method != "none":
        shape_problems = group_size_problems(spec, q.group_size, lambda layer: is_ignored(layer, q.ignore))
        shape_problems += unmatched_ignore_patterns(spec, q.ignore)
        if shape_problems:
            problems.append(RecipeError(shape_problems))
    if spec is not None:
        spec_problems = [p for p in (check_positions(spec, recipe.build.max_sequence_length), fused_graph_problem(spec, recipe))
                         if p]
        if spec_problems:
            problems.append(RecipeError(spec_problems))
    missing = [f"validate.eval_text.{i}.file: {str(text.file)!r} does not exist"
               for i, text in enumerate(recipe.validation.eval_text) if text.file is not None and not text.file.is_file()]
    missing += [f"validate.tasks.{i}.name: task file {task.name!r} does not exist"
                for i, task in enumerate(recipe.validation.tasks) if task.name.endswith((".yaml", ".yml")) and not Path(task.name).is_file()]
    if missing:
        problems.append(RecipeError(missing))
    else:
        try:
            unknown = unknown_task_problems(recipe.validation.tasks)
        except MissingDependency as e:
            problems.append(e)
        else:
            if unknown:
                problems.append(RecipeError(unknown))
    draft = draft_engine_folder(recipe.package.speculative) if recipe.package is not None else None
    if draft is not None:
        source_path = source.resolve_path(recipe.source.path) if spec is not None and recipe.source.path is not None else None
        draft_problems = check_against_source(draft, spec.vocab_size if spec is not None else None,
                                              source_path if source_path is not None and source_path.is_dir() else None)
        if draft_problems:
            problems.append(RecipeError(draft_problems))
    target_problems = recipe_problems(recipe)
    if target_problems:
        problems.append(RecipeError(target_problems))
    reason = unavailable_reason(recipe.build.target)
    if reason:
        problems.append(MissingDependency(f"build.target: {reason}"))
    return problems


def unmatched_ignore_patterns(spec: DecoderSpec, ignore: tuple[str, ...]) -> list[str]:
    """An `ignore` pattern that names no Linear layer of this family (say `q_proj` for Phi-3, whose
    q/k/v are one `qkv_proj`) would silently quantize what the user meant to keep in float."""
    layers = [name for i in range(spec.num_layers) for name in spec.quantizable_layers(i)]
    kinds = sorted({name.rsplit(".", 1)[-1] for name in layers})
    return [f"quantize.ignore: {pattern!r} matches no Linear layer of {spec.architecture}; its layers are named "
            f"{', '.join(kinds)} (a pattern is a layer name or a dotted suffix, e.g. mlp.down_proj)"
            for pattern in ignore if not any(is_ignored(name, (pattern,)) for name in layers)]


def fused_graph_problem(spec: DecoderSpec, recipe: Recipe) -> str | None:
    from pipeline.targets.onnxruntime_ep import fused_graph_refusal

    return fused_graph_refusal(spec) if recipe.build.graph == "fused" else None


def run_stages(recipe: Recipe, ctx: RunContext, names: tuple[str, ...], warn: Callable[[str], None],
               repo_dir: Path) -> dict[str, Artifact]:
    """Build (or reuse from the cache) only the named stages of a recipe, by name: how benchmarks get
    a source, export or engine without validating or registering."""
    specs = [s for s in stages_for(recipe, ctx, warn, repo_dir) if s.name in names]
    return {o.name: o.artifact for o in Runner(ctx, specs).run()}


def stages_for(recipe: Recipe, ctx: RunContext, warn: Callable[[str], None], repo_dir: Path) -> list[StageSpec]:
    settings = ctx.settings
    tracking_uri = settings.tracking_uri(recipe.registration.tracking_uri)
    artifact_location = settings.artifact_location(tracking_uri)
    recipe_text = effective_recipe_text(recipe)
    q = recipe.quantize
    speculative = speculative_settings(recipe.package.speculative) if recipe.package is not None else None
    specs = [
        StageSpec("source", STAGES["source"], SourceCheckpoint, recipe.source,
                  key_extra={"origin": source.origin_fingerprint(recipe.source)},
                  backend=next(k for k in SOURCE_KINDS if getattr(recipe.source, k) is not None)),
        StageSpec("quantize", STAGES["quantize"], QuantizedWeights, q, ("source",),
                  key_extra={"calibration_file": text_fingerprint(q.calibration.text)},
                  backend="none" if q.method == "none" else
                  f"{q.method} ({q.resolved_backend}) int{q.bits} g{q.group_size} {'sym' if q.symmetric else 'asym'}"),
        StageSpec("export", STAGES["export"], OnnxModel, recipe.export, ("source", "quantize"), backend=f"onnx opset {recipe.export.opset}"),
        StageSpec("build", STAGES["build"], Engine, recipe.build, ("export",), backend=recipe.build.target),
        StageSpec("validate", validate.make_run(q.calibration.text, speculative), ValidationReport, recipe.validation, ("source", "build"),
                  key_extra={"eval_texts": [text_fingerprint(t) for t in recipe.validation.eval_text], "speculative": speculative,
                             "calibration_text": q.calibration.text.model_dump(mode="json"),
                             "tasks": [task_fingerprint(t.name) for t in recipe.validation.tasks]},
                  backend=f"gates: {', '.join(k for k, v in recipe.validation.gates.model_dump().items() if v is not None) or 'none'}",
                  check=validate.enforce(recipe.validation.on_gate_failure, warn)),
    ]
    upstream = ("source", "quantize", "export", "build", "validate")
    if recipe.package is not None:
        specs.append(StageSpec("package", STAGES["package"], TritonRepository, recipe.package, ("build",),
                               key_extra={"speculative": speculative}, backend=f"triton model {recipe.package.model_name}"))
        upstream += ("package",)
    specs.append(
        StageSpec("register", register.make_run(recipe.to_yaml_dict(), recipe_text, tracking_uri, artifact_location, repo_dir),
                  Registration, recipe.registration, upstream,
                  key_extra={"tracking_uri": tracking_uri, "recipe_sha256": sha256_bytes(recipe_text.encode())},
                  backend=f"mlflow {tracking_uri}", still_valid=register.still_registered))
    # Each stage is keyed on the code it runs (its module's import closure), so an edit to the CLI or
    # the serving code rebuilds no quantization.
    return [dataclasses.replace(s, code=code_digest(s.run.__module__)) for s in specs]
