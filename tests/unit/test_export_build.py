"""The exported graph and the built engine of the tiny recipe (built once per session)."""

import json

import numpy as np
import onnx
import pytest

from pipeline.artifacts import SourceCheckpoint, read_manifest
from pipeline.modeling.runtime import DecodeState, OrtCausalLM, make_ort_session
from pipeline.quantization.format import load_quantized
from pipeline.recipe import ExportVerifyConfig
from pipeline.stages.export import reference_model, verify_against_torch
from pipeline.targets import get_target, nvidia_gpu_present, unavailable_reason


def test_export_verified_against_torch_for_every_output(tiny_run):
    report = json.loads((tiny_run["paths"]["export"] / "verification.json").read_text())
    outputs = {r["output"]: r for r in report["outputs"]}
    assert set(outputs) == {"logits"} | {f"present.{i}.{k}" for i in range(2) for k in ("key", "value")}
    assert all(r["passed"] for r in outputs.values())
    assert outputs["present.0.key"]["shape"] == [3, 2, 7 + 19, 16]  # batch 3, kv heads 2, past 7 + seq 19


@pytest.mark.parametrize("batch,seq,past", [(1, 1, 0), (2, 5, 0), (4, 3, 11)])
def test_dynamic_axes_at_other_shapes(tiny_run, batch, seq, past):
    source = SourceCheckpoint(path=tiny_run["paths"]["source"])
    layers = load_quantized(tiny_run["paths"]["quantize"] / "quantized.safetensors")
    results = verify_against_torch(tiny_run["paths"]["export"] / "model.onnx", reference_model(source, layers),
                                   ExportVerifyConfig(batch=batch, seq_len=seq, past_len=past, seed=batch))
    assert all(r["passed"] for r in results), results


def test_verification_catches_a_wrong_weight(tiny_run):
    """The parity check can fail: perturb one dequantized weight of the reference (its scales)."""
    import torch

    source = SourceCheckpoint(path=tiny_run["paths"]["source"])
    layers = load_quantized(tiny_run["paths"]["quantize"] / "quantized.safetensors")
    ref = reference_model(source, layers)
    with torch.no_grad():
        ref.model.layers[1].mlp.down_proj.scales.mul_(1.05)
    results = verify_against_torch(tiny_run["paths"]["export"] / "model.onnx", ref, ExportVerifyConfig())
    assert not next(r for r in results if r["output"] == "logits")["passed"]


def assert_onnx_weights_equal_quantizer(export_dir, quant_dir, scratch):
    """DequantizeLinear in ONNX Runtime reproduces the quantizer's dequantized weights bit for bit."""
    from onnx import TensorProto, helper

    model = onnx.load(str(export_dir / "model.onnx"))
    layers = load_quantized(quant_dir / "quantized.safetensors")
    dq_nodes = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq_nodes) == len(layers) > 0
    inits = {t.name: t for t in model.graph.initializer}
    for node in dq_nodes:
        layer = node.name.removesuffix("/DequantizeLinear")
        assert inits[node.input[0]].data_type == TensorProto.UINT4
        graph = helper.make_graph([helper.make_node("DequantizeLinear", list(node.input), ["w"], axis=0,
                                                    block_size=layers[layer].group_size)], "dq", [],
                                  [helper.make_tensor_value_info("w", TensorProto.FLOAT, None)],
                                  [inits[i] for i in node.input])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        m.ir_version = 10
        path = scratch / f"{layer}.dq.onnx"
        onnx.save(m, str(path))
        got = make_ort_session(path, optimization="disable").run(None, {})[0]
        np.testing.assert_array_equal(got, layers[layer].dequantize().T)


def test_onnx_int4_weights_are_the_quantizers_codes_exactly(tiny_run):
    assert_onnx_weights_equal_quantizer(tiny_run["paths"]["export"], tiny_run["paths"]["quantize"], tiny_run["artifacts"])


def test_engine_fuses_every_quantized_matmul(tiny_run):
    engine = tiny_run["paths"]["build"]
    meta = read_manifest(engine)["meta"]
    ops = meta["op_counts"]
    assert meta["quantized_layers"] == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert ops["MatMulNBits"] == 2 * 4  # fused graph: qkv and gate_up packed, o and down alone
    assert ops["GroupQueryAttention"] == 2 and ops["SkipSimplifiedLayerNormalization"] == 4
    assert "DequantizeLinear" not in ops and "Softmax" not in ops
    opts = json.loads((engine / "session_options.json").read_text())
    assert opts["build"]["optimization_level"] == "all" and opts["load"]["optimization_level"] == "disable"
    for f in ("tokenizer.json", "config.json", "engine.onnx"):
        assert (engine / f).is_file()


def test_engine_and_export_agree(tiny_run):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 257, size=(2, 9)).astype(np.int64)
    meta = read_manifest(tiny_run["paths"]["build"])["meta"]
    engine = get_target(meta["target"]).load(tiny_run["paths"]["build"], meta)
    exported = OrtCausalLM(make_ort_session(tiny_run["paths"]["export"] / "model.onnx", optimization="basic"))
    a, state = engine.forward(ids, None)
    b, _ = exported.forward(ids, None)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    assert isinstance(state, DecodeState) and state.length == 9


@pytest.mark.skipif(nvidia_gpu_present(), reason="checks the no-GPU message; this machine has an NVIDIA GPU")
@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime-cuda"])
def test_gpu_targets_fail_clearly_without_gpu(target):
    reason = unavailable_reason(target)
    assert reason.startswith(f"target {target} needs an NVIDIA GPU")


def test_package_links_the_engine_files_instead_of_copying(tiny_run):
    """Each engine byte is written once: the package's engine files are hard links to the build entry."""
    import os

    build = tiny_run["paths"]["build"]
    packaged = next((tiny_run["paths"]["package"] / "model_repository").glob("*/1/engine"))
    files = [p for p in build.iterdir() if p.is_file() and p.name != "manifest.json"]
    assert files and all(os.path.samefile(p, packaged / p.name) for p in files)


def test_package_falls_back_to_a_copy_where_links_fail(tmp_path, monkeypatch):
    import os

    from pipeline.artifacts import link_or_copy

    (tmp_path / "a").write_text("engine")

    def no_link(*_args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    link_or_copy(str(tmp_path / "a"), str(tmp_path / "b"))
    assert (tmp_path / "b").read_text() == "engine" and not os.path.samefile(tmp_path / "a", tmp_path / "b")
