"""register: one MLflow run per recipe run, and a registered model version carrying its lineage.

Uses MLflow's client API only (runs, registered models, versions, tags; no deprecated stages).
Before anything is logged, every upstream artifact is re-hashed against its manifest.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from pipeline.artifacts import Artifact, Registration, verify, write_json_atomic
from pipeline.hashing import sha256_bytes
from pipeline.metric_table import COLUMNS
from pipeline.recipe import RegisterConfig
from pipeline.registry.fetch import PACKAGE_ENGINE_TAG
from pipeline.registry.mlflow_model import save_engine_model
from pipeline.registry.store import client_for, ensure_experiment, ensure_registered_model, global_tracking_uri, store_lock
from pipeline.runner import StageContext
from pipeline.targets.gpu import gpu_tags

if TYPE_CHECKING:
    from mlflow.entities import LoggedModel

# Copied into each MLflow model as its code (never imported here): part of this stage's cache key.
CODE_FILES = ("serving/pyfunc_model.py",)
LIBRARIES = ("torch", "transformers", "onnx", "onnxruntime", "mlflow", "numpy")


def flatten(doc: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten(value, name + ".")
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


def log_mlflow_model(client, experiment_id: str, run_id: str, name: str, engine: Artifact, package: Artifact | None,
                     scratch: Path, lineage: dict) -> LoggedModel:
    """The build as an MLflow pyfunc model (engine and Triton package as its artifacts), logged as
    MLflow 3 does it: a LoggedModel whose source is this run (the run page's "Logged models" lists it)
    and which the version is registered from."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    tags = {k: v for k, v in lineage.items() if not k.startswith("kiln.lib.")}
    logged = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, tags=tags, model_type="kiln-engine")
    try:
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            model = save_engine_model(Path(tmp) / "model", engine, package, Path(tmp) / "parts", tags,
                                      run_id=run_id, model_id=logged.model_id)
            client.log_model_artifacts(logged.model_id, str(model))
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, models=[LoggedModelOutput(logged.model_id, step=0)])
    if package is not None:
        client.set_tag(run_id, PACKAGE_ENGINE_TAG, package.engine_dir)
    return logged


# recipe sections that configure one quantization method only
METHOD_SECTIONS = ("gptq", "awq")


def run_params(recipe_doc: Mapping[str, Any]) -> dict[str, str]:
    """The recipe as MLflow params: the settings this run used. Unset values (None) and the sections
    of quantization methods the run did not use are left out (the full recipe is the run's
    `recipe.yaml` artifact)."""
    method = (recipe_doc.get("quantize") or {}).get("method")
    unused = {f"quantize.{m}." for m in METHOD_SECTIONS if m != method}
    return {k: v for k, v in flatten(recipe_doc).items() if v != "None" and not any(k.startswith(p) for p in unused)}


def git_commit(cwd: Path) -> str:
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} x{os.cpu_count()}"


def library_versions() -> dict[str, str]:
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = "absent"
    return versions


def make_run(recipe_doc: dict[str, Any], recipe_text: str, tracking_uri: str, artifact_location: str | None,
             repo_dir: Path):
    """The register stage function for one recipe run (recipe text and store bound here)."""

    def run(cfg: RegisterConfig, source: Artifact, quantized: Artifact, exported: Artifact, engine: Artifact,
            report: Artifact, package: Artifact | None = None, *, ctx: StageContext) -> Registration:
        from mlflow.entities import Metric, Param, RunTag

        upstream = {"source": source, "quantize": quantized, "export": exported, "build": engine, "validate": report}
        if package is not None:
            upstream["package"] = package
        for artifact in upstream.values():
            verify(artifact.path, full=True)  # never register files that differ from their manifest
        ctx.log(f"all {len(upstream)} upstream artifacts match their sha256 manifests")

        with store_lock(tracking_uri):  # one writer at a time on an embedded sqlite store
            client = client_for(tracking_uri)
            exp_id = ensure_experiment(client, cfg.experiment, artifact_location)
            earlier = version_for_key(client, cfg.model_name, ctx.key)
            if earlier is not None:
                # this very build was registered already (a run killed before it could record that,
                # or a concurrent run of the same recipe): one build, one version
                ctx.log(f"{cfg.model_name} version {earlier.version} already registers this build (stage key {ctx.key}); reusing it")
                record = {"model_name": cfg.model_name, "version": str(earlier.version), "run_id": earlier.run_id,
                          "experiment_id": exp_id, "tracking_uri": tracking_uri}
                write_json_atomic(ctx.out_dir / "registration.json", record)
                return Registration(path=ctx.out_dir, meta=record)
            recipe_sha = sha256_bytes(recipe_text.encode())
            ignored = source.meta.get("origin", {}).get("remote_code_ignored")
            lineage = {
                "kiln.recipe_name": recipe_doc["name"],
                "kiln.recipe_sha256": recipe_sha,
                "kiln.source_sha256": source.digest,
                "kiln.source_origin": json.dumps(source.meta.get("origin", {}))[:4000],
                "kiln.engine_sha256": engine.digest,
                "kiln.quant_method": str(quantized.meta.get("method")),
                "kiln.target": engine.meta["target"],
                "kiln.hardware": hardware(),
                **gpu_tags(engine.meta),
                "kiln.git_commit": git_commit(repo_dir),
                "kiln.code_version": ctx.run.code_version,
                "kiln.validation_passed": str(report.meta["passed"]).lower(),
                "kiln.eval_tokens_sha256": str(report.meta.get("eval_tokens_sha256")),
                **{f"kiln.lib.{k}": v for k, v in library_versions().items()},
                # a checkpoint's own modelling code is never run; say what was ignored, if anything
                **({"kiln.remote_code_ignored": "; ".join(ignored)} if ignored else {}),
            }
            # MLflow's own tags for the run page's Source and Description; the run starts when this
            # `kiln run` started, so its Duration is the whole run's (stages reused from the cache
            # take no time: each stage's own build time is its stage_seconds.* metric)
            ui_tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": f"kiln run ({recipe_doc['name']})",
                       **({"mlflow.source.git.commit": lineage["kiln.git_commit"]} if lineage["kiln.git_commit"] != "unknown" else {}),
                       "mlflow.note.content": f"Kiln's build of recipe **{recipe_doc['name']}** ({lineage['kiln.quant_method']} on "
                                              f"{lineage['kiln.target']}), registered as a version of `{cfg.model_name}`. Its duration is "
                                              "the `kiln run` that registered it (stages reused from the cache take no time); "
                                              "each stage's own build time is in the `stage_seconds.*` metrics."}
            mlrun = client.create_run(exp_id, run_name=recipe_doc["name"], tags={**lineage, **ui_tags}, start_time=ctx.run.started_ms)
            run_id = mlrun.info.run_id
            try:
                now = int(time.time() * 1000)
                metrics = {k: float(v) for k, v in report.meta["metrics"].items()}
                metrics["engine_size_mb"] = sum(f.stat().st_size for f in engine.path.rglob("*") if f.is_file()) / 2**20
                for key in ("mean_relative_output_error", "max_relative_output_error"):
                    if key in quantized.meta:
                        metrics[f"quant.{key}"] = float(quantized.meta[key])
                for name, artifact in upstream.items():
                    manifest = json.loads((artifact.path / "manifest.json").read_text())
                    metrics[f"stage_seconds.{name}"] = float(manifest["seconds"])
                    for key, value in (manifest.get("resources") or {}).items():
                        if value is not None:  # what building the stage cost: peak RSS, disk
                            metrics[f"stage_{key}.{name}"] = float(value)
                params = [Param(k, v[:6000]) for k, v in run_params(recipe_doc).items()]
                for i in range(0, len(params), 100):
                    client.log_batch(run_id, params=params[i : i + 100])
                model = log_mlflow_model(client, exp_id, run_id, cfg.model_name, engine, package, ctx.out_dir, lineage)
                # the build's own metrics also on the logged model's page; what building it cost stays the run's
                client.log_batch(run_id, metrics=[Metric(k, v, now, 0, model_id=None if k.startswith("stage_") else model.model_id)
                                                  for k, v in metrics.items()],
                                 tags=[RunTag("kiln.stage_digests", json.dumps({n: a.digest for n, a in upstream.items()}))])
                recipe_file = ctx.out_dir / "recipe.yaml"
                recipe_file.write_text(recipe_text)
                client.log_artifact(run_id, str(recipe_file))
                client.log_artifacts(run_id, str(report.path), "validation")
                client.log_artifact(run_id, str(quantized.path / "quant_report.json"), "quantize")
                for name, artifact in upstream.items():
                    client.log_artifact(run_id, str(artifact.path / "manifest.json"), f"manifests/{name}")
                client.set_terminated(run_id, "FINISHED")
            except BaseException:
                client.set_terminated(run_id, "FAILED")
                raise

            ensure_registered_model(client, cfg.model_name)
            # registered from `models:/<model_id>` as MLflow's own log_model does (the UI links the
            # version to its logged model by that source)
            with global_tracking_uri(tracking_uri):
                version = client.create_model_version(
                    cfg.model_name, source=f"models:/{model.model_id}", model_id=model.model_id, run_id=run_id,
                    tags={**lineage, KEY_TAG: ctx.key},
                    description=version_description(recipe_doc["name"], lineage, metrics, exp_id, run_id),
                )
            # the logged model names the version it became, as MLflow's own registration does (its
            # pages link the two)
            client.set_logged_model_tags(model.model_id, {"mlflow.modelVersions": json.dumps(
                [{"name": version.name, "version": str(version.version)}])})
            describe_registered_model(client, cfg.model_name, str(version.version), source.meta, lineage, metrics)
            ctx.log(f"registered {cfg.model_name} version {version.version} (run {run_id})")
            record = {"model_name": cfg.model_name, "version": str(version.version), "run_id": run_id,
                      "experiment_id": exp_id, "tracking_uri": tracking_uri}
            write_json_atomic(ctx.out_dir / "registration.json", record)
            return Registration(path=ctx.out_dir, meta=record)

    return run


def version_description(recipe_name: str, lineage: dict[str, str], metrics: dict[str, float], experiment_id: str, run_id: str) -> str:
    """The version page's description, which MLflow shows first: key metrics and lineage in a few
    lines (every tag and metric stays on the version and its run), and links into the MLflow UI.
    A list, not a table: MLflow's UI renders description tables without cell padding (headers ran
    together). The links are the UI's own routes, relative to the page, so they work on any host."""
    rows = [row for row in COLUMNS if row.key in metrics]
    verdict = "passed" if lineage["kiln.validation_passed"] == "true" else "missed its gates"
    run = f"#/experiments/{experiment_id}/runs/{run_id}"
    mode = "?workflowType=machine_learning"  # MLflow 3's "model training" pages (its default is the GenAI ones)
    return "\n".join([
        f"**{recipe_name}**: {lineage['kiln.quant_method']} on {lineage['kiln.target']}; validation {verdict}.", "",
        *(f"- {row.label}: **{row.format(metrics[row.key])}{' ' + row.unit if row.unit else ''}**" for row in rows), "",
        f"Lineage: recipe `{lineage['kiln.recipe_sha256'][:12]}`, source `{lineage['kiln.source_sha256'][:12]}`, "
        f"engine `{lineage['kiln.engine_sha256'][:12]}`, commit `{lineage['kiln.git_commit'][:12]}`, on {lineage['kiln.hardware']}.", "",
        f"[Validation report]({run}/artifactPath/validation/report.html{mode}) · [the run]({run}{mode}) · promotions and rollbacks, "
        f"once there are any: [the run's audit records]({run}/artifactPath/audit{mode})",
    ])


def describe_registered_model(client, name: str, version: str, source_meta: dict, lineage: dict[str, str],
                              metrics: dict[str, float]) -> None:
    """The registered model's description and tags, as MLflow's models list shows them: what it is
    (family, method, target) and its newest version's key metrics, so the list can be scanned
    without opening each model. Versions keep their own tags; these follow the newest one."""
    rows = [row for row in COLUMNS if row.key in metrics]
    shown = {row.key: row.format(metrics[row.key]) + (f" {row.unit}" if row.unit else "") for row in rows}
    # the models list shows a model's first three tags (in the order they were first set): a one-line
    # summary of the newest version first, then the family
    tags = {"kiln.newest": f"v{version} · {lineage['kiln.quant_method']} on {lineage['kiln.target']} · "
                           + " · ".join(f"{row.column or row.label} {shown[row.key]}" for row in rows[:3]),
            "kiln.family": str(source_meta.get("model_type")), "kiln.architecture": str(source_meta.get("architecture")),
            "kiln.quant_method": lineage["kiln.quant_method"], "kiln.target": lineage["kiln.target"], "kiln.newest_version": version,
            **{f"kiln.newest.{row.key}": shown[row.key] for row in rows}}
    for key, value in tags.items():
        client.set_registered_model_tag(name, key, value)
    client.update_registered_model(name, description="\n".join([
        f"Built by Kiln: {source_meta.get('architecture')} ({source_meta.get('model_type')}), {lineage['kiln.quant_method']} "
        f"on {lineage['kiln.target']}. Newest version: {version}.", "",
        *(f"- {row.label}: **{tags[f'kiln.newest.{row.key}']}**" for row in rows), "",
        f"Promote it: `kiln promote {name} {version} --to staging`; compare two: `kiln models diff {name}@production "
        f"{name}@staging`; serve every alias: `kiln serve models:/{name}`.",
    ]))


KEY_TAG = "kiln.register_key"


def version_for_key(client, model_name: str, key: str):
    """The version already registered for this register-stage key (its run finished), or None."""
    from mlflow.exceptions import MlflowException

    if not key:
        return None
    try:
        versions = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException:  # no such model yet
        return None
    for mv in versions:
        if mv.tags.get(KEY_TAG) == key and client.get_run(mv.run_id).info.status == "FINISHED":
            return mv
    return None


def still_registered(registration: Artifact) -> bool:
    """A cached registration is reused only while its version still exists in the store."""
    from mlflow.exceptions import MlflowException

    meta = registration.meta
    try:
        mv = client_for(meta["tracking_uri"]).get_model_version(meta["model_name"], meta["version"])
    except MlflowException:
        return False
    return mv.run_id == meta["run_id"]
