"""The parts of the GPU targets (tensorrt, onnxruntime-cuda) that run without a GPU: recipe checks,
the optimization profile, the graph handed to TensorRT (zero points folded, fp16; run here on
ONNX Runtime CPU), the engine/hardware compatibility check and registry tags. The GPU side is in
tests/gpu/."""

import importlib.util

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from pipeline.errors import EngineMismatch, RecipeError
from pipeline.modeling.runtime import OrtCausalLM, make_ort_session
from pipeline.modeling.tensorrt_graph import KEEP_FP32_OPS, fold_zero_points, write_tensorrt_graph
from pipeline.recipe import load_recipe
from pipeline.targets import nvidia_gpu_present, recipe_problems, unavailable_reason
from pipeline.targets.gpu import check_engine_compatible, gpu_tags
from pipeline.targets.onnxruntime_ep import compare_decoders
from pipeline.targets.tensorrt import CHECK_RTOL, graph_inputs, profile_shapes, timing_cache_name, zero_point_layers
from tests.conftest import TINY_RECIPE

TRT = ["build.target=tensorrt", "package="]


def test_tensorrt_profile_defaults_follow_max_sequence_length():
    build = load_recipe(TINY_RECIPE, TRT).build
    assert build.graph == "portable"  # the fused graph is CPU-only
    t = build.tensorrt
    assert (t.new_tokens.min, t.new_tokens.max) == (1, 256)
    assert (t.past_tokens.min, t.past_tokens.opt, t.past_tokens.max) == (0, 128, 255)
    assert load_recipe(TINY_RECIPE).build.graph == "fused"


@pytest.mark.parametrize("override, message", [
    ("build.graph=fused", "build: graph: fused is built for onnxruntime-cpu only"),
    ("build.tensorrt.batch={min: 4, opt: 1, max: 8}", "build.tensorrt.batch: needs min <= opt <= max (got 4, 1, 8)"),
    ("build.tensorrt.past_tokens={min: 0, opt: 8, max: 256}", "exceeds max_sequence_length (256)"),
    ("build.tensorrt.precision=int8", "build.tensorrt.precision: 'int8' is not one of fp32, fp16"),
])
def test_tensorrt_recipe_errors_name_the_path(override, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY_RECIPE, [*TRT, override])
    assert message in str(err.value)


def test_tensorrt_settings_refused_for_another_target():
    with pytest.raises(RecipeError, match="build: tensorrt: settings for target tensorrt, but target is onnxruntime-cpu"):
        load_recipe(TINY_RECIPE, ["build.tensorrt={precision: fp16}"])


def test_target_recipe_problems():
    problems = recipe_problems(load_recipe(TINY_RECIPE, ["build.target=tensorrt", "quantize.bits=8"]))
    assert problems == ["quantize.bits: target tensorrt takes blocked DequantizeLinear for int4 weights only; allowed: 4 (got 8)"]
    assert recipe_problems(load_recipe(TINY_RECIPE, TRT)) == []
    assert recipe_problems(load_recipe(TINY_RECIPE, [*TRT, "build.int4_compute=int8"])) == [
        "build.int4_compute: int8 is ONNX Runtime CPU's MatMulNBits setting; target tensorrt allows: fp32"]
    cpu_gate = load_recipe(TINY_RECIPE, ["validate.gates.max_gpu_memory_mb=100"])
    assert recipe_problems(cpu_gate) == ["validate.gates.max_gpu_memory_mb: target onnxruntime-cpu runs on the CPU; "
                                         "the gate applies to onnxruntime-cuda and tensorrt"]


@pytest.mark.skipif(nvidia_gpu_present() or importlib.util.find_spec("tensorrt") is not None,
                    reason="checks the message of a machine with neither a GPU nor tensorrt")
def test_kiln_check_names_what_tensorrt_needs(tmp_path):
    from tests.conftest import run_kiln

    out = run_kiln("check", str(TINY_RECIPE), *[a for o in TRT for a in ("--set", o)], artifacts=tmp_path)
    assert out.returncode == 5
    assert "target tensorrt needs an NVIDIA GPU and the tensorrt package; this machine has neither" in out.stdout
    assert unavailable_reason("tensorrt") == "target tensorrt needs an NVIDIA GPU and the tensorrt package; this machine has neither"


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime")
def test_onnxruntime_cuda_on_a_gpu_machine_names_the_missing_provider(monkeypatch):
    # The message a GPU machine with the CPU build of onnxruntime prints (seen on a lent H200).
    import onnxruntime

    import pipeline.targets as targets

    monkeypatch.setattr(targets, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert targets.unavailable_reason("onnxruntime-cuda") == (
        "target onnxruntime-cuda needs the onnxruntime-gpu package; the installed onnxruntime has no CUDAExecutionProvider")


def test_profile_covers_every_input_of_the_exported_graph(tiny_run):
    inputs = graph_inputs(tiny_run["paths"]["export"] / "model.onnx")
    shapes = profile_shapes(inputs, load_recipe(TINY_RECIPE, TRT).build.tensorrt)
    assert set(shapes) == set(inputs)
    assert shapes["input_ids"] == ((1, 1), (1, 1), (8, 256))
    assert shapes["attention_mask"] == ((1, 1), (1, 129), (8, 511))
    assert shapes["past_key_values.0.key"] == ((1, 2, 0, 16), (1, 2, 128, 16), (8, 2, 255, 16))


def test_zero_points_folded_exactly(tiny_run, tmp_path):
    """TensorRT takes no zero points: the fold rewrites (q - z) * s as signed codes plus a group-sum
    correction matmul. Same outputs as the exported graph up to fp32 rounding, no zero point left."""
    exported = tiny_run["paths"]["export"] / "model.onnx"
    assert zero_point_layers(exported)  # the tiny recipe is asymmetric
    model = onnx.load(str(exported))
    original = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    folded = fold_zero_points(model)
    assert folded == len(zero_point_layers(exported))
    path = tmp_path / "folded.onnx"
    onnx.save(model, str(path))
    assert zero_point_layers(path) == []
    for t in model.graph.initializer:
        if t.name.endswith(".qweight"):
            assert t.data_type == TensorProto.INT4
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(t).astype(np.int16),
                                          original[t.name].astype(np.int16) - 8)
    check = compare_decoders(OrtCausalLM(make_ort_session(exported)), OrtCausalLM(make_ort_session(path)), vocab=257)
    assert check["greedy_tokens_equal"] and check["max_rel_logit_diff"] < 1e-5


def test_fp16_graph_for_tensorrt_runs_and_matches_the_exported_graph(tiny_run, tmp_path):
    """The graph TensorRT parses for precision fp16, run on ONNX Runtime CPU: the folded int4 codes
    unchanged by the conversion, fp16 KV cache, norms and softmax in fp32, logits within the
    engine check's fp16 tolerance."""
    exported = tiny_run["paths"]["export"] / "model.onnx"
    typed = tmp_path / "typed.onnx"
    assert write_tensorrt_graph(exported, "fp16", typed) > 0
    model = onnx.load(str(typed))
    folded = onnx.load(str(exported))
    fold_zero_points(folded)
    original = {t.name: t for t in folded.graph.initializer}
    for init in model.graph.initializer:
        if init.data_type in (TensorProto.INT4, TensorProto.UINT4):
            assert init.data_type == TensorProto.INT4
            assert onnx.numpy_helper.to_array(init).tobytes() == onnx.numpy_helper.to_array(original[init.name]).tobytes()
    types = {vi.name: vi.type.tensor_type.elem_type for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    for node in model.graph.node:
        if node.op_type in KEEP_FP32_OPS:
            assert types[node.output[0]] == TensorProto.FLOAT, node.name
    io = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert io["logits"] == TensorProto.FLOAT and io["past_key_values.0.key"] == TensorProto.FLOAT16

    reference = OrtCausalLM(make_ort_session(exported))
    fp16 = OrtCausalLM(make_ort_session(typed))
    assert fp16.kv_dtype == np.float16
    check = compare_decoders(reference, fp16, vocab=257)
    assert check["max_rel_logit_diff"] < CHECK_RTOL["fp16"]
    assert check["max_rel_logit_diff"] > 1e-5  # it did compute in fp16


def test_engine_refused_on_another_gpu_or_tensorrt_version():
    built = {"tensorrt_version": "10.13.0", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "driver_version": "580"}
    check_engine_compatible(built, {**built, "driver_version": "590"}, "engine")  # driver updates are fine
    with pytest.raises(EngineMismatch) as err:
        check_engine_compatible(built, {**built, "gpu_name": "NVIDIA L4", "compute_capability": "8.9"}, "the engine in x")
    assert "gpu_name: built with 'NVIDIA H100 80GB HBM3', this machine has 'NVIDIA L4'" in str(err.value)
    assert "compute_capability: built with '9.0', this machine has '8.9'" in str(err.value)
    with pytest.raises(EngineMismatch, match="tensorrt_version: built with '10.13.0', this machine has '11.0.0'"):
        check_engine_compatible(built, {**built, "tensorrt_version": "11.0.0"}, "engine")
    assert timing_cache_name(built) == "NVIDIA-H100-80GB-HBM3-sm90-trt10.13.0.timing"


def test_gpu_tags_only_for_gpu_engines():
    assert gpu_tags({"target": "onnxruntime-cpu"}) == {}
    hw = {"gpu_name": "NVIDIA H200", "compute_capability": "9.0", "driver_version": "580.1", "tensorrt_version": "10.13.0"}
    assert gpu_tags({"hardware": hw}) == {"kiln.gpu": "NVIDIA H200", "kiln.compute_capability": "9.0",
                                          "kiln.gpu_driver": "580.1", "kiln.tensorrt_version": "10.13.0"}


def test_fp16_graph_keeps_rmsnorm_statistics_fp32_for_massive_activations():
    """SmolLM2's residual stream reaches |h| ~ 2e4, whose mean square overflows fp16's 65504: the
    whole statistics chain must stay fp32, not only its ops one by one with fp16 casts between."""
    from onnx import helper

    from pipeline.modeling.tensorrt_graph import to_fp16

    hidden = 8
    consts = [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]), helper.make_tensor("axes", TensorProto.INT64, [1], [-1]),
              helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-5]),
              helper.make_tensor("w", TensorProto.FLOAT, [hidden], [1.0] * hidden)]
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"], name="pow"),
             helper.make_node("ReduceMean", ["sq", "axes"], ["mean"], name="mean", keepdims=1),
             helper.make_node("Add", ["mean", "eps"], ["var"], name="add"),
             helper.make_node("Sqrt", ["var"], ["std"], name="sqrt"),
             helper.make_node("Div", ["x", "std"], ["normed"], name="div"),
             helper.make_node("Mul", ["normed", "w"], ["logits"], name="scale")]
    graph = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, hidden])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, hidden])], consts)
    model = to_fp16(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    x = np.full((1, hidden), 2.0e4, dtype=np.float16)
    x[0, 0] = -1.0e3
    import onnxruntime as ort

    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    xf = x.astype(np.float64)
    expected = xf / np.sqrt((xf ** 2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(got, expected, rtol=2e-3)
