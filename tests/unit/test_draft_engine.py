"""The draft model of `package.speculative: {method: draft}`: `kiln check` and the package stage
refuse a draft engine of another vocabulary, one that differs from its manifest, or a folder that
is no engine, naming the recipe field; the recipe's own engine is accepted as a draft."""

import json
import shutil

import pytest

from pipeline.artifacts import read_manifest, write_manifest
from pipeline.draft_engine import checked_draft
from pipeline.errors import RecipeError
from tests.conftest import TINY_RECIPE, run_kiln


def check(draft, tmp_path):
    return run_kiln("check", str(TINY_RECIPE), "--set", f"package.speculative={{method: draft, draft_engine: {draft}}}",
                    artifacts=tmp_path / "artifacts")


def other_vocabulary(engine, dest):
    """The engine folder with one token more, manifested anew: a draft from another tokenizer."""
    shutil.copytree(engine, dest)
    tokenizer = json.loads((dest / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["Ġdraft"] = len(tokenizer["model"]["vocab"]) + len(tokenizer.get("added_tokens", []))
    (dest / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((dest / "config.json").read_text())
    config["vocab_size"] += 1
    (dest / "config.json").write_text(json.dumps(config))
    record = {k: v for k, v in read_manifest(engine).items() if k not in ("files", "digest")}
    write_manifest(dest, record)
    return dest


def test_kiln_check_accepts_an_engine_of_the_same_vocabulary(tiny_run, tmp_path):
    out = check(tiny_run["paths"]["build"], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_draft_engine_of_another_vocabulary_is_refused(tiny_run, tmp_path):
    draft = other_vocabulary(tiny_run["paths"]["build"], tmp_path / "other")
    out = check(draft, tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "package.speculative.draft_engine: the draft engine's vocabulary has" in " ".join(out.stdout.split())
    with pytest.raises(RecipeError, match="vocabulary differs from this recipe's engine"):  # the package stage's check
        checked_draft(draft, tiny_run["paths"]["build"] / "tokenizer.json")
    assert checked_draft(tiny_run["paths"]["build"], tiny_run["paths"]["build"] / "tokenizer.json")["digest"]


def test_a_tampered_or_missing_draft_engine_is_refused(tiny_run, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_run["paths"]["build"], tampered)
    (tampered / "config.json").write_text((tampered / "config.json").read_text() + " ")
    out = check(tampered, tmp_path)
    assert out.returncode == 2 and "sha256 mismatch: config.json" in " ".join(out.stdout.split())
    (tmp_path / "empty").mkdir()
    out = check(tmp_path / "empty", tmp_path)
    assert out.returncode == 2 and "is not a Kiln engine folder" in " ".join(out.stdout.split())
    for text in ("not json", '{"files": 3}'):  # a manifest that cannot be read: refused, no traceback
        (tampered / "manifest.json").write_text(text)
        out = check(tampered, tmp_path)
        assert out.returncode == 2 and "is not a Kiln manifest" in " ".join(out.stdout.split()) and "Traceback" not in out.stderr
