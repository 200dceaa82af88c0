"""GGUF files as llama.cpp's own converter writes them (tests/llamacpp_gguf.py), read by Kiln: the
tokenizer's ids equal llama.cpp's on multilingual text and code, the dequantized model's logits are
within tolerance of llama.cpp's on the same file (Q8_0 and a 4-bit file), and a converted Gemma 3
and Qwen2 file build end to end. The real SmolLM2 Q4_1 file (Llama) is checked the same way."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.modeling.gguf_checkpoint import GgufMetadata, gguf_config, gguf_to_checkpoint
from pipeline.modeling.hf import load_causal_lm, load_tokenizer, make_random_model
from pipeline.recipe import RandomModelConfig
from pipeline.stages.source import resolve_path
from tests import llamacpp_gguf
from tests.conftest import TINY_RECIPE, run_kiln

REFERENCE = json.loads(llamacpp_gguf.REFERENCE.read_text(encoding="utf-8"))["files"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each reference file rebuilt here by llama.cpp's converter; a reference applies only to the same bytes."""
    root, work = llamacpp_gguf.llama_cpp_root(), tmp_path_factory.mktemp("llamacpp")
    files = {}
    for name, outtype, quant in llamacpp_gguf.FILES:
        key = llamacpp_gguf.file_key(name, outtype, quant)
        path = llamacpp_gguf.QUANTIZED_DIR / REFERENCE[key]["file"] if quant else llamacpp_gguf.make_gguf(name, outtype, work, root)
        assert llamacpp_gguf.sha256(path) == REFERENCE[key]["sha256"], f"{path.name} differs from the file llama.cpp was run on"
        files[key] = path
    for key, uri in llamacpp_gguf.REAL_FILES.items():
        files[key] = resolve_path(uri)
        assert llamacpp_gguf.sha256(files[key]) == REFERENCE[key]["sha256"]
    return files


@pytest.fixture(scope="module")
def checkpoints(converted, tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoints")
    for key, path in converted.items():
        gguf_to_checkpoint(path, out / key)
    return {key: out / key for key in converted}


@pytest.mark.parametrize("key", list(REFERENCE))
def test_tokenizer_ids_equal_llama_cpp(key, checkpoints):
    """From the checkpoint folder Kiln writes (what every later stage and the server load)."""
    tokenizer = load_tokenizer(checkpoints[key])
    for text, ids in REFERENCE[key]["tokens"].items():
        assert tokenizer(text)["input_ids"] == ids, text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("key", list(REFERENCE))
def test_logits_match_llama_cpp(key, checkpoints):
    """llama.cpp multiplies quantized weights by 8-bit-quantized activations; Kiln's source is the
    dequantized weights in float32: agreement within 5 % of the logits' range, and llama.cpp's top
    token within that tolerance of Kiln's top at every position (tiny random models have near ties)."""
    ref = REFERENCE[key]
    model = load_causal_lm(checkpoints[key])
    with torch.no_grad():
        logits = model(torch.tensor([ref["prompt_ids"]])).logits[0].float().numpy()
    want = np.array(ref["logits"], dtype=np.float32)
    scale = np.abs(want).max()
    assert np.abs(logits[:, ref["columns"]] - want).max() <= 0.05 * scale, key
    at_llama_top = logits[np.arange(len(logits)), ref["argmax"]]
    assert np.all(at_llama_top >= logits.max(-1) - 0.05 * scale), key


def test_the_files_chat_template_is_the_checkpoints(converted, checkpoints):
    """What `kiln serve`'s chat completions render: the template llama.cpp's converter copied into the file."""
    with_template = 0
    for key, path in converted.items():
        template = GgufMetadata(path).value("tokenizer.chat_template")
        written = checkpoints[key] / "chat_template.jinja"
        assert (written.read_text() if written.is_file() else None) == (template or None), key
        with_template += bool(template)
    assert GgufMetadata(converted["smollm2-Q4_1"]).value("tokenizer.chat_template") and with_template >= 1


def test_parity_check_can_fail(converted, tmp_path, monkeypatch):
    """Without undoing Gemma's norm shift the logits leave the tolerance (the check is not vacuous)."""
    from dataclasses import replace

    from pipeline.modeling import gguf_checkpoint

    rows = gguf_checkpoint.GGUF_ARCHITECTURES
    monkeypatch.setitem(rows, "gemma3", replace(rows["gemma3"], norm_shift=0.0))
    gguf_to_checkpoint(converted["gemma3-q8_0"], tmp_path / "wrong")
    ref = REFERENCE["gemma3-q8_0"]
    with torch.no_grad():
        logits = load_causal_lm(tmp_path / "wrong")(torch.tensor([ref["prompt_ids"]])).logits[0].numpy()
    want = np.array(ref["logits"])
    assert np.abs(logits[:, ref["columns"]] - want).max() > 0.05 * np.abs(want).max()


def test_gemma3_pattern_and_scale_come_from_llama_cpp_conventions(converted):
    config = gguf_config(GgufMetadata(converted["gemma3-q8_0"]))
    assert config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert config.query_pre_attn_scalar == config.head_dim == 16
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0


@pytest.mark.parametrize("key", ["gemma3-Q4_0", "qwen2-q8_0"])
def test_converted_file_builds_end_to_end(key, converted, tmp_path):
    """`kiln run` from the GGUF file: source, RTN int4, export, fused engine, validate (gates pass on
    the file's own model) and register; the engine's tokenizer is the one checked above."""
    doc = yaml.safe_load(TINY_RECIPE.read_text())
    doc["source"] = {"path": str(converted[key])}
    doc["validate"]["gates"] = {"max_ppl_increase_pct": 50, "min_next_token_agreement": 0.5}
    doc["register"]["model_name"] = f"gguf-{key}"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    run_kiln("run", str(recipe), artifacts=tmp_path / "artifacts", check=True)
    summary = json.loads((tmp_path / "artifacts" / "last_run.json").read_text())
    paths = {s["stage"]: Path(s["path"]) for s in summary["stages"]}
    source = json.loads((paths["source"] / "manifest.json").read_text())["meta"]
    assert source["origin"]["kind"] == "gguf" and source["origin"]["sha256"] == REFERENCE[key]["sha256"]
    assert summary["validation_passed"] and summary["metrics"]["next_token_agreement"] >= 0.5
    tokenizer = load_tokenizer(paths["build"])
    for text, ids in REFERENCE[key]["tokens"].items():
        assert tokenizer(text)["input_ids"] == ids, text


def test_an_architecture_kiln_does_not_read_is_refused_at_check(tmp_path):
    """llama.cpp writes many architectures; one Kiln has no row for is refused with the reason."""
    from tests.gguf_files import write_gguf

    make_random_model(RandomModelConfig(family="qwen2", config={"use_sliding_window": False}), tmp_path / "hf")
    write_gguf(tmp_path / "hf", tmp_path / "model.gguf")
    data = (tmp_path / "model.gguf").read_bytes().replace(b"qwen2", b"bloom", 1)  # general.architecture
    (tmp_path / "bloom.gguf").write_bytes(data)
    doc = yaml.safe_load(TINY_RECIPE.read_text())
    doc["source"] = {"path": str(tmp_path / "bloom.gguf")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    proc = run_kiln("check", str(tmp_path / "r.yaml"), artifacts=tmp_path)
    text = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2 and "Traceback" not in text, text
    assert "GGUF architecture 'bloom' (written by llama.cpp) is not read by Kiln; read: llama, qwen2, qwen3, gemma2, gemma3, phi3, granite, olmo2" in text
