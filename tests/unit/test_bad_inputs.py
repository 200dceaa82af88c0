"""Hostile or broken files given to `kiln check`: each is refused quickly with exit 2, a message
that says what is wrong (values shortened), and no traceback."""

import pytest
import yaml

from pipeline.errors import RecipeError
from pipeline.recipe import MAX_RECIPE_BYTES, load_recipe
from tests.conftest import TINY_RECIPE, run_kiln

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))


def tiny_doc() -> dict:
    return yaml.safe_load(TINY_RECIPE.read_text())


def problems(tmp_path, content) -> list[str]:
    path = tmp_path / "r.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert e.value.exit_code == 2
    return e.value.problems


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    """~600 bytes that expand to 9^9 values (the old loader ran 90 s and 1.9 GB on one like it)."""
    assert len(BOMB) < 700
    assert problems(tmp_path, BOMB) == ["the YAML expands to more than 100000 values (aliases included); a recipe is far smaller"]
    assert problems(tmp_path, "a: &a [1]\n" + "".join(f"k{i}: *a\n" for i in range(101))) == [
        "101 YAML aliases; a recipe may use at most 100"]


def test_aliases_that_expand_too_far_are_refused(tmp_path):
    """Few aliases (under the alias limit), each list of ten: 10^5 values once expanded."""
    names = ["a"] + [f"l{i}" for i in range(5)]
    doc = "a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n"
    for prev, name in zip(names, names[1:]):
        doc += f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]\n"
    found = problems(tmp_path, doc)
    assert found == ["the YAML expands to more than 100000 values (aliases included); a recipe is far smaller"], found


def test_a_file_larger_than_any_recipe_is_refused(tmp_path):
    doc = "".join(f"key{i}: {i}\n" for i in range(120_000))
    assert len(doc) > MAX_RECIPE_BYTES
    assert problems(tmp_path, doc)[0].endswith(f"a recipe is at most {MAX_RECIPE_BYTES} bytes")


def test_many_unknown_keys_are_reported_briefly(tmp_path):
    doc = tiny_doc()
    doc["quantize"].update({f"k{i}": i for i in range(5000)})
    found = problems(tmp_path, doc)
    assert len(found) == 51 and found[-1] == "... and 4950 more problems"


def test_non_utf8_and_non_mapping_files(tmp_path):
    assert problems(tmp_path, b"name: caf\xe9\n") == ["not UTF-8 text (byte 0xe9 at offset 9)"]
    assert problems(tmp_path, "- just\n- a list\n") == ["the top level must be a mapping of sections"]


def test_long_bad_values_are_quoted_shortened(tmp_path):
    doc = tiny_doc()
    doc["quantize"]["method"] = "x" * 5000
    (found,) = problems(tmp_path, doc)
    assert found.startswith("quantize.method: 'xxxx") and "(5002 characters) is not one of none, rtn, gptq, awq" in found
    assert len(found) < 300


@pytest.mark.parametrize("section,key,value,message", [
    ("validate", "gates", {"max_ppl_increase_pct": -5}, "validate.gates.max_ppl_increase_pct: Input should be greater than or equal to 0"),
    ("validate", "gates", {"max_ppl_increase_pct": float("nan")}, "validate.gates.max_ppl_increase_pct: Input should be a finite number"),
    ("validate", "gates", {"min_tokens_per_s": float("inf")}, "validate.gates.min_tokens_per_s: Input should be a finite number"),
    ("validate", "latency", {"prompt_tokens": 16, "new_tokens": 1_000_000_000},
     "validate.latency: prompt_tokens + new_tokens = 1000000016 exceeds build.max_sequence_length 256"),
    ("validate", "window", 512, "validate.window: 512 exceeds build.max_sequence_length 256"),
    ("package", "max_tokens_cap", 256, "package.max_tokens_cap: 256 leaves no room for a prompt in build.max_sequence_length 256"),
])
def test_absurd_numbers_are_refused_statically(tmp_path, section, key, value, message):
    doc = tiny_doc()
    doc[section][key] = value
    found = problems(tmp_path, doc)
    assert any(p.startswith(message) for p in found), found


def test_kiln_check_on_bad_files_exits_2_without_a_traceback(tmp_path):
    for name, content in (("bomb.yaml", BOMB.encode()), ("latin1.yaml", b"name: caf\xe9\n")):
        path = tmp_path / name
        path.write_bytes(content)
        proc = run_kiln("check", str(path), artifacts=tmp_path)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr and f"{name} is invalid" in proc.stdout


def test_a_config_json_that_links_to_another_file_is_refused(tmp_path):
    from pipeline.plan import static_problems

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").symlink_to("/etc/passwd")
    doc = tiny_doc()
    doc["source"] = {"path": str(folder)}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    (problem,) = static_problems(load_recipe(path))
    assert problem.exit_code == 2 and "config.json is not valid JSON" in problem.problems[0]
