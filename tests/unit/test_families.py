"""Every supported family, from one parametrized set of tests on tiny random models built from a
transformers config with the family's features switched on (`ARCHITECTURES[...].tiny`): export
parity against transformers on every output at shapes unlike the writer's, fused graph against
exported graph, a decode step beyond the sliding window, the group-size check's layer names, and
GPTQ through llm-compressor on two non-Llama families."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from pipeline.artifacts import OnnxModel, SourceCheckpoint
from pipeline.modeling.decoder import ARCHITECTURES, FAMILIES, SLIDING, spec_from_folder, tiny_config
from pipeline.modeling.hf import load_causal_lm, make_random_model
from pipeline.modeling.runtime import OrtCausalLM, make_ort_session
from pipeline.modeling.shapes import group_size_problems
from pipeline.quantization import is_ignored
from pipeline.quantization.rtn import quantize_rtn
from pipeline.recipe import BuildConfig, ExportVerifyConfig, QuantizeConfig, RandomModelConfig, load_recipe
from pipeline.stages.export import reference_model, verify_against_torch, write_onnx
from pipeline.targets.onnxruntime_ep import OnnxRuntime, compare_decoders
from tests.conftest import TINY_RECIPE, run_kiln

GROUP = 16


def linear_modules(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def export(source: SourceCheckpoint, layers, out_dir):
    out_dir.mkdir()
    meta = write_onnx(source, layers, None, out_dir / "model.onnx")
    return OnnxModel(path=out_dir, meta=meta)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """A tiny random model of the family, its RTN int4 codes, its export and its fused engine."""
    root = tmp_path_factory.mktemp(request.param)
    make_random_model(RandomModelConfig(family=request.param, seed=1), root / "source" / "model")
    source = SourceCheckpoint(path=root / "source")
    model = load_causal_lm(source.model_dir)
    layers = {n: quantize_rtn(m.weight.detach().numpy(), 4, GROUP, False) for n, m in linear_modules(model).items()}
    exported = export(source, layers, root / "export")
    (root / "fused").mkdir()
    meta = OnnxRuntime("onnxruntime-cpu").build(exported, root / "fused", BuildConfig(graph="fused", max_sequence_length=64),
                                                lambda _m: None)
    return SimpleNamespace(name=request.param, spec=spec_from_folder(source.model_dir), source=source, layers=layers,
                           exported=exported, fused=OnnxRuntime("onnxruntime-cpu").load(root / "fused", meta), fused_meta=meta)


def test_every_family_has_its_features_on_in_the_tiny_model(family):
    """The tiny config really exercises what the row says the family has."""
    spec = family.spec
    expected = {"mistral": spec.sliding_window == 8 and set(spec.layer_kinds) == {SLIDING},
                "qwen2": spec.qkv_bias and spec.layer_kinds == ("full_attention", SLIDING),
                "qwen3": spec.qk_norm == "head",
                "phi3": spec.fused_qkv and spec.fused_gate_up and spec.rotary_dim < spec.head_dim and spec.rope_type == "longrope",
                "gemma2": spec.norm_offset == 1.0 and spec.attention_softcap and spec.final_softcap and spec.activation == "gelu_tanh"
                and spec.norms.attn_out and spec.norms.mlp_out and spec.embedding_multiplier == 8.0,
                "gemma3": spec.qk_norm == "head" and set(spec.layer_rope) == {"full_attention", SLIDING} and spec.final_softcap,
                "granite": spec.residual_multiplier != 1 and spec.logit_divisor != 1 and spec.embedding_multiplier != 1,
                "olmo2": spec.qk_norm == "full" and spec.norms.attn_in is None and spec.norms.mlp_in is None,
                "llama": spec.rope_type == "llama3"}
    assert expected[family.name], spec


def test_export_matches_transformers_on_every_output(family):
    """Batch 3, 19 new tokens after a past of 7: shapes unlike anything the writer assumes."""
    results = verify_against_torch(family.exported.model_file, reference_model(family.source, family.layers),
                                   ExportVerifyConfig(batch=3, seq_len=19, past_len=7))
    assert len(results) == 1 + 2 * family.spec.num_layers
    assert all(r["passed"] for r in results), [r for r in results if not r["passed"]]


def test_export_parity_can_fail(family):
    """10 % noise on each group scale of the last down_proj in the reference is caught, for every
    family (noise, not one factor: the post norms of Gemma and OLMo 2 would cancel a scale)."""
    reference = reference_model(family.source, family.layers)
    with torch.no_grad():
        scales = dict(reference.named_modules())[f"model.layers.{family.spec.num_layers - 1}.mlp.down_proj"].scales
        scales.mul_(1 + 0.1 * torch.randn(scales.shape, generator=torch.Generator().manual_seed(0)))
    results = verify_against_torch(family.exported.model_file, reference, ExportVerifyConfig())
    assert not next(r for r in results if r["output"] == "logits")["passed"]


def test_decode_step_beyond_the_sliding_window(family):
    """One new token after a past longer than the window: sliding layers must drop the oldest keys."""
    if family.spec.sliding_window is None:
        pytest.skip(f"{family.name} has no sliding window")
    past = family.spec.sliding_window + 5
    results = verify_against_torch(family.exported.model_file, reference_model(family.source, family.layers),
                                   ExportVerifyConfig(batch=2, seq_len=1, past_len=past, seed=3))
    assert all(r["passed"] for r in results), [r for r in results if not r["passed"]]


def test_fused_graph_computes_what_the_export_computes(family):
    """Max |Δlogits| and identical greedy tokens over 16 decode steps after a prompt longer than any window."""
    exported = OrtCausalLM(make_ort_session(family.exported.model_file, optimization="basic"))
    check = compare_decoders(exported, family.fused, family.spec.vocab_size, prompt_len=24, steps=16, batch=2)
    assert check["greedy_tokens_equal"] and check["max_rel_logit_diff"] < 1e-4, check
    ops = family.fused_meta["op_counts"]
    assert ops["GroupQueryAttention"] == family.spec.num_layers and "DequantizeLinear" not in ops


class NoText:
    """The scheduler's detokenizer for a model with no tokenizer: ids are all these tests compare."""

    def decode(self, ids, skip_special_tokens=True):
        return ""


def test_prompt_lookup_gives_plain_decodings_greedy_tokens_past_the_window(family):
    """Speculative decoding (prompt lookup) on the fused engine and the portable graph: drafts
    verified in one forward and rolled back give the tokens plain decoding gives, also once the
    sequence is longer than a sliding window and with q/k norms."""
    from pipeline.engine import GenerationRequest, Scheduler

    base = np.random.default_rng(5).integers(0, family.spec.vocab_size, size=6)
    prompt = tuple(int(t) for t in np.tile(base, 4))  # 24 tokens that repeat: drafts from the start

    def generate(lm, speculative):
        scheduler = Scheduler(lm, NoText(), set(), 1, speculative=speculative)
        row = scheduler.admit(GenerationRequest(prompt, 32), lambda delta, finish: None)
        while scheduler.active:
            scheduler.step()
        return row.seq.ids, scheduler.draft_stats

    # the fused engine rolls back by length; the portable graph (the export) cuts its state
    portable = OrtCausalLM(make_ort_session(family.exported.model_file, optimization="basic"))
    for lm in (family.fused, portable):
        plain, _ = generate(lm, None)
        fast, stats = generate(lm, {"method": "prompt_lookup", "max_draft_tokens": 8})
        assert fast == plain and stats.verifications > 0
    if family.spec.sliding_window is not None:
        assert len(prompt) + len(plain) > 2 * family.spec.sliding_window


def test_group_size_check_names_the_familys_own_layers(family):
    spec = family.spec
    problems = group_size_problems(spec, 128, lambda layer: is_ignored(layer, ("lm_head",)))
    first_module = spec.projection(0, "q")[0]
    assert any(f"in_features 64 of {first_module};" in p for p in problems), problems
    if spec.fused_qkv:
        assert first_module.endswith("qkv_proj")
    # the layers the check names are the layers the quantizer will see
    model = load_causal_lm(family.source.model_dir)
    layer0 = {n: m.in_features for n, m in linear_modules(model).items() if n.startswith("model.layers.0.")}
    assert layer0 == {n: f for n, f in spec.quantizable_layers().items() if n != "lm_head"}


def test_architecture_table_rows_name_their_features():
    assert set(FAMILIES) == {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "granite", "olmo2"}
    assert all(row.features for row in ARCHITECTURES.values())


@pytest.mark.parametrize("family_name", ["qwen2", "phi3"])
def test_gptq_through_llm_compressor_then_export_parity(family_name, tmp_path):
    """llm-compressor maps its sequential targets per architecture; its codes for a family with
    biases (Qwen2) and one with fused projections (Phi-3, split after quantization) export exactly."""
    from pipeline.quantization import get_quantizer

    make_random_model(RandomModelConfig(family=family_name, seed=2), tmp_path / "source" / "model")
    source = SourceCheckpoint(path=tmp_path / "source")
    names = list(linear_modules(load_causal_lm(source.model_dir)))
    cfg = QuantizeConfig(method="gptq", bits=4, group_size=GROUP)
    calibration = [list(np.random.default_rng(s).integers(0, 256, size=32)) for s in range(4)]
    layers = get_quantizer("gptq", "llm-compressor")(source.model_dir, names, cfg, calibration, lambda _n: None).layers
    assert set(layers) == set(names)
    if family_name == "phi3":
        assert "model.layers.0.self_attn.qkv_proj" in layers
    exported = export(source, layers, tmp_path / "export")
    results = verify_against_torch(exported.model_file, reference_model(source, layers), ExportVerifyConfig())
    assert all(r["passed"] for r in results), [r for r in results if not r["passed"]]


# --------------------------------------------------------------------------- kiln check knows the families

def checkpoint_folder(tmp_path, config) -> str:
    folder = tmp_path / "ckpt"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return str(folder)


def check_messages(tmp_path, source: dict, quantize: dict | None = None, **build) -> list[str]:
    """`kiln check`'s problems (in process) for the tiny recipe with another source; each must be a
    recipe error (exit 2)."""
    from pipeline.errors import RecipeError
    from pipeline.plan import static_problems

    doc = yaml.safe_load(TINY_RECIPE.read_text())
    doc["source"] = source
    doc["build"].update(build)
    doc["quantize"].update(quantize or {})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    problems = static_problems(load_recipe(path))
    assert all(isinstance(p, RecipeError) and p.exit_code == 2 for p in problems), problems
    return [m for p in problems for m in p.problems]


def test_kiln_check_refuses_gpt2_cleanly(tmp_path):
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 300}
    doc = yaml.safe_load(TINY_RECIPE.read_text())
    doc["source"] = {"path": checkpoint_folder(tmp_path, gpt2)}
    recipe = tmp_path / "gpt2.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    proc = run_kiln("check", str(recipe), artifacts=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    text = " ".join(proc.stdout.split())  # the console wraps long lines
    assert "architecture ['GPT2LMHeadModel'] is not supported by Kiln; supported: LlamaForCausalLM, MistralForCausalLM" in text
    assert "source.path: " in text and text.rstrip().endswith("Olmo2ForCausalLM")


@pytest.mark.parametrize("architecture,model_type", [("Qwen2MoeForCausalLM", "qwen2_moe"), ("LlavaForConditionalGeneration", "llava")])
def test_mixture_of_experts_and_vision_models_are_refused(tmp_path, architecture, model_type):
    messages = check_messages(tmp_path, {"path": checkpoint_folder(tmp_path, {"architectures": [architecture], "model_type": model_type})})
    assert any(f"architecture ['{architecture}'] is not supported by Kiln; supported:" in m for m in messages), messages


def test_config_missing_a_needed_key_names_the_key_and_file(tmp_path):
    config = tiny_config("qwen2", {}).to_dict()
    del config["hidden_size"]
    folder = checkpoint_folder(tmp_path, config)
    messages = check_messages(tmp_path, {"path": folder})
    assert any(f"{folder}/config.json: Qwen2ForCausalLM needs key 'hidden_size'" in m for m in messages), messages


def test_config_that_is_not_json_is_refused(tmp_path):
    messages = check_messages(tmp_path, {"path": checkpoint_folder(tmp_path, "{not json")})
    assert any("config.json is not valid JSON" in m for m in messages), messages


def test_longrope_past_its_original_context_is_refused_with_the_yaml_path(tmp_path):
    messages = check_messages(tmp_path, {"random_model": {"family": "phi3"}}, max_sequence_length=512)
    assert any(m.startswith("build.max_sequence_length: 512 exceeds 256") and "longrope" in m for m in messages), messages


def test_fused_graph_refused_for_head_sizes_onnx_runtime_cannot_run(tmp_path):
    source = {"random_model": {"family": "llama", "hidden_size": 96, "num_attention_heads": 8, "num_key_value_heads": 2}}
    messages = check_messages(tmp_path, source)
    assert messages and all("build.graph: fused needs head_dim divisible by 16" in m and "allowed for it: portable" in m
                            for m in messages), messages
    assert check_messages(tmp_path, source, graph="portable") == []



@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_graph_uses_only_what_tensorrt_documents(family, precision, tmp_path):
    """The graph the tensorrt target hands TensorRT, for every family, against onnx-tensorrt's
    documented operator support (op types, input types, zero points, constant axes), read from the
    written file as the target's pre-flight reads it."""
    import onnx

    from pipeline.modeling.tensorrt_graph import tensorrt_unsupported, write_tensorrt_graph

    assert tensorrt_unsupported(onnx.load(str(family.exported.model_file)))  # zero points: the check can fail
    out = tmp_path / "tensorrt_input.onnx"
    assert write_tensorrt_graph(family.exported.model_file, precision, out) == 7 * family.spec.num_layers  # fused modules split
    assert tensorrt_unsupported(onnx.load(str(out), load_external_data=False)) == []


def test_a_random_model_config_transformers_rejects_is_a_recipe_error(tmp_path):
    """Phi-3's longrope factors must match its rotary dims; a head layout that breaks them is refused cleanly."""
    messages = check_messages(tmp_path, {"random_model": {"family": "phi3", "hidden_size": 64, "num_attention_heads": 4}})
    assert any(m.startswith("source.random_model: transformers rejects this phi3 config") for m in messages), messages


def test_an_ignore_pattern_the_family_does_not_have_is_refused(tmp_path):
    """Phi-3 has no q_proj (its q/k/v are one qkv_proj): ignoring `q_proj` would keep nothing in float."""
    source = {"random_model": {"family": "phi3"}}
    assert check_messages(tmp_path, source) == []
    messages = check_messages(tmp_path, source, {"ignore": ["lm_head", "self_attn.q_proj", "self_attn.qkv_proj"]})
    assert len(messages) == 1 and messages[0].startswith("quantize.ignore: 'self_attn.q_proj' matches no Linear layer of Phi3ForCausalLM")
    assert "qkv_proj" in messages[0]


# --------------------------------------------------------------------------- GGUF sources of other families

# What a GGUF file of tests/gguf_files.py's writer carries for each family: no rope scaling,
# partial rotary or sliding window keys, so the tiny models leave those off. Files as llama.cpp's
# own converter writes them: tests/unit/test_gguf_llamacpp.py.
GGUF_FAMILIES = {"llama": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
                 "qwen2": {"use_sliding_window": False},
                 "qwen3": {},
                 "phi3": {"sliding_window": None, "partial_rotary_factor": 1.0,
                          "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}}


@pytest.mark.parametrize("family_name", list(GGUF_FAMILIES))
def test_gguf_source_of_another_family(family_name, tmp_path):
    """A GGUF file of the family (written with the gguf package) is described from its metadata as
    the HF folder is, and dequantizes to the same tensors."""
    import dataclasses

    from safetensors.numpy import load_file

    from pipeline.modeling.decoder import spec_from_gguf
    from pipeline.modeling.gguf_checkpoint import gguf_to_checkpoint
    from tests.gguf_files import write_gguf

    make_random_model(RandomModelConfig(family=family_name, config=GGUF_FAMILIES[family_name]), tmp_path / "hf")
    write_gguf(tmp_path / "hf", tmp_path / "model.gguf")
    from_gguf, from_folder = spec_from_gguf(tmp_path / "model.gguf"), spec_from_folder(tmp_path / "hf")
    assert from_gguf.norm_eps == pytest.approx(from_folder.norm_eps, rel=1e-6)  # GGUF stores it as float32
    assert dataclasses.replace(from_gguf, norm_eps=from_folder.norm_eps) == from_folder
    gguf_to_checkpoint(tmp_path / "model.gguf", tmp_path / "back")
    original, back = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(original) == set(back) and all(np.array_equal(original[k], back[k]) for k in original)


def test_a_truncated_gguf_is_a_clean_recipe_error(tmp_path):
    from tests.gguf_files import write_gguf

    make_random_model(RandomModelConfig(family="qwen2", config=GGUF_FAMILIES["qwen2"]), tmp_path / "hf")
    write_gguf(tmp_path / "hf", tmp_path / "full.gguf")
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "full.gguf").read_bytes()[:300])
    messages = check_messages(tmp_path, {"path": str(tmp_path / "cut.gguf")})
    assert len(messages) == 1 and messages[0].startswith(f"source.path: {tmp_path / 'cut.gguf'}: cannot read its GGUF metadata"), messages


def test_a_tied_head_is_stored_once(tmp_path):
    """A tied checkpoint's embedding table is written once in the export and in the fused engine."""
    import onnx

    make_random_model(RandomModelConfig(family="qwen2", config={"tie_word_embeddings": True}), tmp_path / "source" / "model")
    source = SourceCheckpoint(path=tmp_path / "source")
    spec = spec_from_folder(source.model_dir)
    assert spec.tie_word_embeddings
    layers = {n: quantize_rtn(m.weight.detach().numpy(), 4, GROUP, False) for n, m in linear_modules(load_causal_lm(source.model_dir)).items()}
    exported = export(source, layers, tmp_path / "export")
    results = verify_against_torch(exported.model_file, reference_model(source, layers), ExportVerifyConfig())
    assert all(r["passed"] for r in results)
    (tmp_path / "fused").mkdir()
    meta = OnnxRuntime("onnxruntime-cpu").build(exported, tmp_path / "fused", BuildConfig(max_sequence_length=64), lambda _m: None)
    for graph in (exported.model_file, tmp_path / "fused" / meta["model_file"]):
        tables = [t.name for t in onnx.load(str(graph)).graph.initializer
                  if sorted(t.dims) == sorted([spec.vocab_size, spec.hidden_size])]
        assert len(tables) == 1, (graph, tables)
