"""The tiny recipe through the real CLI into the embedded MLflow store."""

import json
from pathlib import Path

import mlflow.artifacts
import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus

from tests.conftest import ROOT, TINY_RECIPE, run_kiln

pytestmark = pytest.mark.integration


def client(tiny_run) -> MlflowClient:
    uri = tiny_run["registered"]["tracking_uri"]
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_registered_version_has_lineage_metrics_and_artifacts(tiny_run, tmp_path):
    reg = tiny_run["registered"]
    assert reg["tracking_uri"] == f"sqlite:///{tiny_run['artifacts'] / 'mlflow.db'}"
    c = client(tiny_run)
    mv = c.get_model_version(reg["model_name"], reg["version"])
    for tag in ("kiln.recipe_sha256", "kiln.source_sha256", "kiln.git_commit", "kiln.code_version", "kiln.target",
                "kiln.hardware", "kiln.lib.onnxruntime", "kiln.lib.torch", "kiln.validation_passed"):
        assert mv.tags.get(tag), tag
    assert mv.tags["kiln.target"] == "onnxruntime-cpu" and mv.tags["kiln.validation_passed"] == "true"
    run = c.get_run(mv.run_id)
    # the description: metrics as a list (MLflow's UI renders description tables without padding),
    # links to the report and the run by the UI's own routes
    run_route = f"#/experiments/{run.info.experiment_id}/runs/{mv.run_id}"
    assert f"({run_route}/artifactPath/validation/report.html?workflowType=machine_learning)" in mv.description
    assert "|---" not in mv.description
    assert sum(line.startswith("- ") for line in mv.description.splitlines()) >= 3  # one line per key metric
    # the registered model says what it is and how its newest version scores, for the models list
    model = c.get_registered_model(reg["model_name"])
    assert model.tags["kiln.family"] == "llama" and model.tags["kiln.newest_version"] == str(reg["version"])
    assert model.tags["kiln.quant_method"] == "rtn" and any(k.startswith("kiln.newest.") for k in model.tags)
    assert f"kiln promote {reg['model_name']} {reg['version']} --to staging" in model.description
    # the run's Duration is the whole `kiln run` (here every stage was built in it), not the registration alone
    built = sum(v for k, v in run.data.metrics.items() if k.startswith("stage_seconds."))
    assert (run.info.end_time - run.info.start_time) / 1000 >= 0.9 * built > 0
    # the run page's Source and Description
    assert run.data.tags["mlflow.source.name"] == "kiln run (tiny-llama-int4-cpu)" and "stage_seconds" in run.data.tags["mlflow.note.content"]
    # MLflow 3's UI shows the experiment as model development, not as a GenAI app's traces
    assert c.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.data.params["quantize.group_size"] == "32"
    # only what this RTN run used: no GPTQ/AWQ settings, no unset values
    assert not [k for k in run.data.params if k.startswith(("quantize.gptq.", "quantize.awq."))]
    assert "None" not in run.data.params.values()
    assert run.data.metrics["engine_ppl"] == pytest.approx(tiny_run["metrics"]["engine_ppl"])
    for stage in ("source", "quantize", "export", "build", "validate", "package"):  # what each stage cost
        assert run.data.metrics[f"stage_peak_rss_mb.{stage}"] > 0 and f"stage_disk_written_mb.{stage}" in run.data.metrics
    assert run.data.metrics["stage_children_peak_rss_mb.validate"] > 0  # the latency runs' own processes
    top = {a.path for a in c.list_artifacts(mv.run_id)}
    assert {"validation", "manifests", "recipe.yaml"} <= top and "model" not in top  # the model is logged once, as a LoggedModel
    # the version is the MLflow model, logged as MLflow 3 does: a LoggedModel of this run (the run
    # page's "Logged models"), READY, with the build's metrics (not what building it cost)
    assert mv.source.startswith("models:/m-")
    logged = c.get_logged_model(mv.source.removeprefix("models:/"))
    assert logged.source_run_id == mv.run_id and logged.status.to_int() == LoggedModelStatus.READY.to_int()
    assert logged.tags["kiln.engine_sha256"] == mv.tags["kiln.engine_sha256"]
    assert {m.key for m in logged.metrics} >= {"engine_ppl", "engine_size_mb"} and not any(m.key.startswith("stage_") for m in logged.metrics)
    assert [o.model_id for o in run.outputs.model_outputs] == [logged.model_id]
    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=c.get_model_version_download_uri(mv.name, mv.version),
                                                         dst_path=str(tmp_path), tracking_uri=reg["tracking_uri"]))
    assert {"MLmodel", "artifacts", "code"} <= {p.name for p in model_dir.iterdir()}
    assert {"engine.onnx", "manifest.json", "tokenizer.json"} <= {p.name for p in (model_dir / "artifacts" / "engine").iterdir()}
    assert f"model_id: {logged.model_id}" in (model_dir / "MLmodel").read_text()


def test_registering_prints_no_library_chatter(tiny_run):
    """MLflow's type-hint UserWarning, its INFO line and its artifact progress bars stay out of
    `kiln run`'s output."""
    output = tiny_run["output"]
    assert "registered tiny-llama-int4 version" in output or "MLflow: tiny-llama-int4 version" in output
    for chatter in ("Warning", "INFO mlflow", "Downloading artifacts", "Uploading artifacts", "it/s]"):
        assert chatter not in output, chatter
    # and it says what to do with the new version (nothing holds an alias yet)
    assert f"Next: kiln promote tiny-llama-int4 {tiny_run['registered']['version']} --to staging" in output


def test_the_store_keeps_the_engine_once_and_the_package_comes_back_whole(tiny_run, tmp_path):
    """The Triton package is logged without the engine files it hard-links; fetching it puts them
    back from `engine/` and verifies the whole package against its manifest."""
    from pipeline.registry.fetch import fetch_triton_repository

    reg = tiny_run["registered"]
    c = client(tiny_run)
    mv = c.get_model_version(reg["model_name"], reg["version"])
    engine_dir = c.get_run(mv.run_id).data.tags["kiln.triton_engine_dir"]
    stored = Path(mlflow.artifacts.download_artifacts(artifact_uri=c.get_model_version_download_uri(mv.name, mv.version) + "/artifacts/triton", dst_path=str(tmp_path / "raw"),
                                                      tracking_uri=reg["tracking_uri"]))
    assert not (stored / engine_dir).exists() and (stored / engine_dir).parent.is_dir()
    repository = fetch_triton_repository(c, reg["tracking_uri"], mv, tmp_path / "fetched")
    package = tiny_run["paths"]["package"]
    assert (tmp_path / "fetched" / engine_dir / "engine.onnx").read_bytes() == (package / engine_dir / "engine.onnx").read_bytes()
    assert sorted(p.relative_to(repository) for p in repository.rglob("*")) == sorted(
        p.relative_to(package / "model_repository") for p in (package / "model_repository").rglob("*"))


def test_plan_after_a_run_reuses_every_stage(tiny_run):
    proc = run_kiln("run", str(TINY_RECIPE), "--plan", artifacts=tiny_run["artifacts"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    actions = {line.split("│")[1].strip(): line.split("│")[2].strip()
               for line in proc.stdout.splitlines() if line.startswith("│") and line.split("│")[1].strip()}
    assert actions == {s: "reuse" for s in ("source", "quantize", "export", "build", "validate", "package", "register")}, proc.stdout


def test_deleted_store_is_noticed_and_registration_redone(tiny_run, tmp_path):
    """A cached registration whose MLflow store is gone is not reused as if it were there."""
    store = tmp_path / "other.db"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    first = run_kiln("run", str(TINY_RECIPE), artifacts=tiny_run["artifacts"], env=env)
    assert first.returncode == 0 and "register: built" in first.stdout, first.stdout + first.stderr
    store.unlink()
    again = run_kiln("run", str(TINY_RECIPE), artifacts=tiny_run["artifacts"], env=env)
    assert again.returncode == 0 and "register: built" in again.stdout, again.stdout + again.stderr
    summary = json.loads((tiny_run["artifacts"] / "last_run.json").read_text())
    assert summary["registered"]["version"] == "1" and summary["registered"]["tracking_uri"] == env["MLFLOW_TRACKING_URI"]
    # A sqlite store keeps its run artifacts beside itself, never in the directory kiln ran from.
    assert (tmp_path / "mlruns").is_dir()
    assert not (ROOT / "mlruns").exists()


def test_a_tampered_cache_entry_is_set_aside_and_rebuilt(tmp_path):
    """One flipped byte in a cached engine: the re-run notices (sha256), keeps the damaged entry for
    inspection, rebuilds it, and the package (which links the engine's files) is rebuilt too."""
    run_kiln("run", str(TINY_RECIPE), artifacts=tmp_path, check=True)
    summary = json.loads((tmp_path / "last_run.json").read_text())
    build = next(s for s in summary["stages"] if s["stage"] == "build")
    engine = next(p for p in sorted(Path(build["path"]).glob("engine.onnx*")) if p.stat().st_size > 1024)
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine.write_bytes(bytes(data))
    proc = run_kiln("run", str(TINY_RECIPE), artifacts=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    statuses = {s["stage"]: s["status"] for s in json.loads((tmp_path / "last_run.json").read_text())["stages"]}
    assert statuses["build"] == "built" and statuses["package"] == "built" and statuses["export"] == "reused"
    assert "failed its manifest" in proc.stdout and "sha256 mismatch" in proc.stdout
    assert list((tmp_path / "cache" / "build").glob(".damaged-*"))
    assert run_kiln("run", str(TINY_RECIPE), artifacts=tmp_path, check=True)  # and the rebuilt entry is whole
    assert all(s["status"] == "reused" for s in json.loads((tmp_path / "last_run.json").read_text())["stages"])


def test_identical_runs_write_identical_bytes(tiny_run, tmp_path):
    """Two RTN runs of one recipe into separate caches: every file of source, quantize, export and
    build is byte-identical (so the cache keys downstream of them agree too)."""
    from pipeline.artifacts import read_manifest

    run_kiln("run", str(TINY_RECIPE), artifacts=tmp_path, check=True)
    second = {s["stage"]: s for s in json.loads((tmp_path / "last_run.json").read_text())["stages"]}
    for stage in ("source", "quantize", "export", "build"):
        first = read_manifest(tiny_run["paths"][stage])
        again = read_manifest(Path(second[stage]["path"]))
        assert first["files"] == again["files"], stage
        assert tiny_run["paths"][stage].name == Path(second[stage]["path"]).name  # same key


def test_a_copied_store_is_refused_and_the_original_stays_promotable(tmp_path):
    """The embedded store records absolute artifact paths: a copy of the artifacts folder must not
    promote (or register into) the original's files. The copy, tampered, is refused naming the
    original; the original is promoted as usual."""
    import shutil

    original, copy = tmp_path / "original", tmp_path / "copy"
    run_kiln("run", str(TINY_RECIPE), artifacts=original, check=True)
    shutil.copytree(original, copy)
    engine = next((copy / "mlruns").rglob("engine/engine.onnx"))
    engine.write_bytes(engine.read_bytes() + b"tampered")
    for args in (("promote", "tiny-llama-int4", "1", "--to", "staging"), ("models", "show", "tiny-llama-int4"),
                 ("run", str(TINY_RECIPE))):
        refused = run_kiln(*args, artifacts=copy)
        text = " ".join(refused.stdout.split())
        assert refused.returncode == 6, (args, refused.stdout + refused.stderr)
        assert f"keeps artifacts in {original / 'mlruns'}" in text and "Traceback" not in refused.stdout + refused.stderr
    run_kiln("promote", "tiny-llama-int4", "1", "--to", "staging", artifacts=original, check=True)


def test_an_alias_nobody_set_says_how_to_set_it(tiny_run):
    name = tiny_run["registered"]["model_name"]
    shown = run_kiln("models", "show", f"{name}@production", artifacts=tiny_run["artifacts"])
    assert shown.returncode == 8, shown.stdout + shown.stderr
    assert f"kiln promote {name} VERSION --to production" in " ".join(shown.stdout.split()), shown.stdout
    assert "Traceback" not in shown.stdout + shown.stderr


def test_version_and_short_help(tmp_path):
    from importlib.metadata import version

    shown = run_kiln("--version", artifacts=tmp_path, check=True)
    assert shown.stdout.strip() == f"kiln {version('kiln')}"
    assert "Usage: " in run_kiln("-h", artifacts=tmp_path, check=True).stdout
    assert "Usage: " in run_kiln("models", "-h", artifacts=tmp_path, check=True).stdout
    for command in (("check",), ("run",), ("models", "list"), ("models", "show"), ("models", "pull"), ("promote",),
                    ("rollback",), ("ui",), ("serve",)):
        shown = run_kiln(*command, "-h", artifacts=tmp_path, check=True).stdout
        assert "Example: kiln " + command[0] in shown, (command, shown)


def test_a_new_store_is_created_without_mlflow_bookkeeping_lines(tmp_path):
    listed = run_kiln("models", "list", artifacts=tmp_path)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert (tmp_path / "mlflow.db").is_file()  # the store was created by this call
    assert "database tables" not in listed.stdout + listed.stderr


def test_run_output_puts_the_deliverables_in_a_named_folder(tiny_run, tmp_path):
    import os

    from pipeline.artifacts import verify
    from pipeline.serving.commands import local_repository

    out = tmp_path / "build" / "tiny"
    for _ in range(2):  # a second run replaces its own earlier output
        run_kiln("run", str(TINY_RECIPE), "--output", str(out), artifacts=tiny_run["artifacts"], check=True)
    assert os.path.samefile(out / "engine" / "engine.onnx", tiny_run["paths"]["build"] / "engine.onnx")  # linked, not copied
    for part in ("engine", "validation"):
        verify(out / part, full=True)
    assert (out / "validation" / "report.md").is_file()
    assert local_repository(out) == out / "triton" / "model_repository"  # what `kiln serve OUT` serves
    assert json.loads((out / "run.json").read_text())["registered"]["model_name"] == tiny_run["registered"]["model_name"]
    assert not list(out.parent.glob(".*partial*"))

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    refused = run_kiln("run", str(TINY_RECIPE), "--output", str(foreign), artifacts=tiny_run["artifacts"])
    assert refused.returncode == 2 and "is not an earlier kiln output" in refused.stdout, refused.stdout
    assert "source:" not in refused.stdout and (foreign / "mine.txt").read_text() == "keep me"
