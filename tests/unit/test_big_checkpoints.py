"""Bounded-memory paths (issue 14): layer-by-layer RTN, the checkpoint's own precision, graphs written
tensor by tensor, and references that hold no float copy of a quantized layer. No memory or timing
thresholds: each test checks what the path computes or what it keeps."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pipeline.artifacts import SourceCheckpoint
from pipeline.modeling.decoder import describe, hf_config, rotary_tables
from pipeline.modeling.decoder_graph import portable_graph
from pipeline.modeling.hf import SafetensorsWeights, checkpoint_dtype, load_causal_lm, make_random_model, read_config
from pipeline.modeling.weights import CheckpointWeights
from pipeline.quantization import rtn_quantizer
from pipeline.quantization.reference import quantized_reference
from pipeline.quantization.rtn import quantize_rtn
from pipeline.recipe import QuantizeConfig, RandomModelConfig
from pipeline.stages.export import write_onnx
from tests.conftest import TINY_RECIPE, run_kiln


def whole_model_rtn(model_dir: Path, cfg: QuantizeConfig) -> dict:
    """The path before streaming: the whole model loaded in float32, each Linear's weight quantized."""
    model = load_causal_lm(model_dir)
    return {n: quantize_rtn(m.weight.detach().float().numpy(), cfg.bits, cfg.group_size, cfg.symmetric)
            for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("family,dtype,tied", [("llama", "float32", False), ("phi3", "float32", False),
                                               ("qwen2", "bfloat16", True)])
def test_layer_by_layer_rtn_codes_equal_the_whole_model_path(tmp_path, family, dtype, tied):
    """Phi-3's fused qkv/gate_up modules, a bf16 checkpoint and a tied (quantized) head included."""
    make_random_model(RandomModelConfig(family=family, seed=2, config={"tie_word_embeddings": tied}), tmp_path, dtype)
    assert checkpoint_dtype(tmp_path) == dtype
    cfg = QuantizeConfig(method="rtn", group_size=16, ignore=())
    expected = whole_model_rtn(tmp_path, cfg)
    streamed = rtn_quantizer(tmp_path, list(expected), cfg, None, lambda n: None).layers
    assert set(streamed) == set(expected) and "lm_head" in streamed
    for name, q in expected.items():
        for field in ("codes", "scales", "zeros"):
            np.testing.assert_array_equal(getattr(streamed[name], field), getattr(q, field), err_msg=f"{name}.{field}")


def test_a_bf16_checkpoint_stays_bf16_and_the_reference_says_so(tmp_path):
    """source.dtype bfloat16: half the bytes on disk, export parity against the same bf16 values,
    validation's PyTorch reference computing in bf16 and saying so."""
    run = run_kiln("run", str(TINY_RECIPE), "--set", "source.dtype=bfloat16", "--set", "register.model_name=tiny-bf16",
                   artifacts=tmp_path, check=True)
    assert "source (PyTorch bfloat16)" in run.stdout
    last = json.loads((tmp_path / "last_run.json").read_text())
    paths = {s["stage"]: Path(s["path"]) for s in last["stages"]}
    source = json.loads((paths["source"] / "manifest.json").read_text())
    assert source["meta"]["dtype"] == "bfloat16" and checkpoint_dtype(paths["source"] / "model") == "bfloat16"
    config = json.loads((paths["source"] / "model" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    verification = json.loads((paths["export"] / "verification.json").read_text())
    assert all(o["passed"] for o in verification["outputs"])
    assert "| metric | source (PyTorch bfloat16) | engine |" in (paths["validate"] / "report.md").read_text()
    assert json.loads((paths["validate"] / "validation.json").read_text())["source_dtype"] == "bfloat16"


def test_a_folder_is_cast_only_when_the_recipe_asks(tmp_path):
    from pipeline.stages.source import place_checkpoint

    make_random_model(RandomModelConfig(family="llama"), tmp_path / "bf16", "bfloat16")
    place_checkpoint(tmp_path / "bf16", tmp_path / "auto", "auto", print)
    place_checkpoint(tmp_path / "bf16", tmp_path / "fp32", "float32", print)
    assert checkpoint_dtype(tmp_path / "auto") == "bfloat16" and checkpoint_dtype(tmp_path / "fp32") == "float32"
    assert (tmp_path / "auto" / "model.safetensors").read_bytes() == (tmp_path / "bf16" / "model.safetensors").read_bytes()
    a, b = SafetensorsWeights(tmp_path / "bf16"), SafetensorsWeights(tmp_path / "fp32")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])  # bf16 -> fp32 is exact
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"


def test_the_streamed_export_writes_the_graph_the_in_memory_writer_builds(tmp_path):
    """Initializers written to model.onnx.data as they are made give the same graph and the same
    tensors as building the whole model in memory."""
    make_random_model(RandomModelConfig(family="gemma2", seed=3), tmp_path / "source" / "model")
    source = SourceCheckpoint(path=tmp_path / "source")
    layers = {n: quantize_rtn(w, 4, 16, False) for n, w in
              ((n, m.weight.detach().numpy()) for n, m in load_causal_lm(source.model_dir).named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head")}
    (tmp_path / "export").mkdir()
    write_onnx(source, layers, None, tmp_path / "export" / "model.onnx")
    streamed = onnx.load(str(tmp_path / "export" / "model.onnx"))  # external data read back
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in
               onnx.load(str(tmp_path / "export" / "model.onnx"), load_external_data=False).graph.initializer)
    config = hf_config(read_config(source.model_dir), "config.json")
    spec = describe(config)
    in_memory = portable_graph(spec, CheckpointWeights(spec, SafetensorsWeights(source.model_dir), layers),
                               rotary_tables(config, spec))
    assert [n.SerializeToString() for n in streamed.graph.node] == [n.SerializeToString() for n in in_memory.graph.node]
    got = {t.name: onnx.numpy_helper.to_array(t) for t in streamed.graph.initializer}
    want = {t.name: onnx.numpy_helper.to_array(t) for t in in_memory.graph.initializer}
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_the_quantized_reference_keeps_codes_not_float_weights(tmp_path):
    """Its parameters are only the tensors kept in float (embedding, norms, the ignored head); each
    quantized layer holds its codes and computes with exactly the dequantized weight."""
    make_random_model(RandomModelConfig(family="llama"), tmp_path)
    float_model = load_causal_lm(tmp_path)
    names = [n for n, m in float_model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    layers = {n: quantize_rtn(dict(float_model.named_modules())[n].weight.detach().numpy(), 4, 16, False) for n in names}
    reference = quantized_reference(tmp_path, layers, {})
    params = dict(reference.named_parameters())
    assert not any(n.removesuffix(".weight") in layers for n in params)
    assert sum(p.numel() for p in params.values()) == sum(
        p.numel() for n, p in float_model.named_parameters() if n.removesuffix(".weight") not in layers)
    modules = dict(reference.named_modules())
    for name, q in layers.items():
        assert modules[name].codes.dtype == torch.uint8
        np.testing.assert_array_equal(modules[name].weight.numpy(), q.dequantize())


@pytest.mark.parametrize("content,message", [(b"\xff" * 16, "header of"), (b"\x05\0\0\0\0\0\0\0{nope", "not JSON"),
                                             (b"", "not JSON")])
def test_a_damaged_safetensors_header_is_a_clear_error(tmp_path, content, message):
    from pipeline.modeling.hf import SourceError

    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(SourceError, match=message):
        SafetensorsWeights(tmp_path)
    with pytest.raises(SourceError, match=message):
        checkpoint_dtype(tmp_path)


def test_the_report_streams_a_tied_quantized_head_from_the_embedding(tmp_path):
    """`ignore: []` on a tied checkpoint quantizes the head, whose float weight is the embedding table."""
    from pipeline.stages.quantize import layer_report

    make_random_model(RandomModelConfig(family="llama", config={"tie_word_embeddings": True}), tmp_path, "bfloat16")
    cfg = QuantizeConfig(method="rtn", group_size=16, ignore=())
    names = list(whole_model_rtn(tmp_path, cfg))
    result = rtn_quantizer(tmp_path, names, cfg, None, lambda n: None)
    report = layer_report(tmp_path, result, [list(range(1, 40)), list(range(50, 90))], lambda n: None)
    assert set(report) == set(names) and "lm_head" in report
    expected = np.linalg.norm(SafetensorsWeights(tmp_path)["model.embed_tokens.weight"] - result.layers["lm_head"].dequantize())
    expected /= np.linalg.norm(SafetensorsWeights(tmp_path)["model.embed_tokens.weight"])
    assert report["lm_head"]["relative_weight_error"] == pytest.approx(expected, rel=1e-5)
    assert all(0 < r["relative_output_error"] < 1 for r in report.values())
