"""GPU targets end to end on the tiny recipe: build, the build-time check against the exported
graph, validation with GPU memory, hardware tags, refusal on a mismatched machine, timing-cache
reuse. Marked `gpu`; each test skips with the target's own reason where it cannot run (every CPU
machine, this project's CI included). docs/gpu.md lists where these have run."""

import json
from pathlib import Path

import mlflow
import pytest

from pipeline.artifacts import read_manifest
from pipeline.errors import EngineMismatch
from pipeline.targets import get_target, unavailable_reason
from tests.conftest import TINY_RECIPE, run_kiln

pytestmark = pytest.mark.gpu


def gpu_run(target: str, artifacts, *extra: str) -> dict:
    """The tiny recipe on a GPU target; the run summary plus the CLI's stdout."""
    overrides = [f"build.target={target}", "package=", *extra]
    proc = run_kiln("run", str(TINY_RECIPE), *[a for o in overrides for a in ("--set", o)], artifacts=artifacts, check=True)
    summary = json.loads((artifacts / "last_run.json").read_text())
    summary["paths"] = {s["stage"]: s["path"] for s in summary["stages"]}
    summary["stdout"] = proc.stdout
    return summary


def skip_unless(target: str):
    reason = unavailable_reason(target)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


@skip_unless("tensorrt")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine_builds_validates_and_registers(tmp_path, precision):
    summary = gpu_run("tensorrt", tmp_path, f"build.tensorrt.precision={precision}")
    meta = read_manifest(Path(summary["paths"]["build"]))["meta"]
    assert meta["model_file"] == "engine.plan" and meta["hardware"]["tensorrt_version"]
    assert meta["engine_check"]["max_rel_logit_diff"] < {"fp32": 5e-3, "fp16": 3e-2}[precision]
    assert summary["metrics"]["gpu_memory_mb"] > 0
    registered = summary["registered"]
    version = mlflow.MlflowClient(registered["tracking_uri"]).get_model_version(registered["model_name"], registered["version"])
    assert version.tags["kiln.gpu"] == meta["hardware"]["gpu_name"]
    assert version.tags["kiln.tensorrt_version"] == meta["hardware"]["tensorrt_version"]


@skip_unless("tensorrt")
def test_tensorrt_engine_refused_on_another_gpu_and_timing_cache_reused(tmp_path):
    summary = gpu_run("tensorrt", tmp_path)
    engine_dir = Path(summary["paths"]["build"])
    meta = read_manifest(engine_dir)["meta"]
    elsewhere = {**meta, "hardware": {**meta["hardware"], "gpu_name": "some other GPU"}}
    with pytest.raises(EngineMismatch, match="gpu_name: built with 'some other GPU'"):
        get_target("tensorrt").load(engine_dir, elsewhere)
    caches = list((tmp_path / "cache" / "shared" / "tensorrt").glob("*.timing"))
    assert len(caches) == 1 and caches[0].stat().st_size > 0
    # another profile means another engine; the timing cache measured above is reused
    rebuilt = gpu_run("tensorrt", tmp_path, "build.tensorrt.batch={min: 1, opt: 2, max: 4}")
    assert "timing cache" in rebuilt["stdout"] and "reused" in rebuilt["stdout"]


@skip_unless("onnxruntime-cuda")
def test_onnxruntime_cuda_engine_builds_and_validates(tmp_path):
    summary = gpu_run("onnxruntime-cuda", tmp_path)
    meta = read_manifest(Path(summary["paths"]["build"]))["meta"]
    assert meta["session_options"]["providers"][0] == "CUDAExecutionProvider"
    assert meta["hardware"]["gpu_name"]
    assert summary["metrics"]["gpu_memory_mb"] > 0
    assert summary["metrics"]["ppl_increase_pct"] < 25
