"""`kiln serve`: the whole package's manifest is checked whichever of its folders it is given; the HTTP
guard checks generate bodies against the model's declared inputs."""

import shutil

import pytest

from pipeline.errors import IntegrityError
from pipeline.serving.commands import local_repository
from tests.conftest import run_kiln


@pytest.fixture
def package(tiny_run, tmp_path):
    copy = tmp_path / "package"
    shutil.copytree(tiny_run["paths"]["package"], copy)
    return copy


def test_every_folder_of_a_package_is_served_after_its_manifest(package):
    model = next((package / "model_repository").iterdir())
    for given in (package, package / "model_repository", model, model / "1"):
        assert local_repository(given) == package.resolve() / "model_repository"


@pytest.mark.parametrize("edit", ["config.pbtxt", "1/model.py", "1/engine/tokenizer.json"])
def test_an_edited_file_is_refused_whichever_folder_is_named(package, edit):
    model = next((package / "model_repository").iterdir())
    with open(model / edit, "a") as f:
        f.write("\n# edited\n")
    for given in (package, package / "model_repository", model / "1"):
        with pytest.raises(IntegrityError, match="sha256 mismatch"):
            local_repository(given)


def test_a_model_repository_without_a_manifest_is_refused(package, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(package / "model_repository", bare / "model_repository")
    with pytest.raises(IntegrityError, match="is not inside a Kiln package"):
        local_repository(bare / "model_repository")
    proc = run_kiln("serve", str(bare / "model_repository"), artifacts=tmp_path)
    assert proc.returncode == 6 and "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("body, problem", [
    (b'{"text_input": "hi", "max_tokens": 4, "stream": false, "seed": 18446744073709551615}', None),
    (b'{"text_input": ["hi"], "stop": ["a", "b"], "temperature": 0}', None),
    (b'{"text_input": "hi", "unknown": {"a": 1}}', None),  # not an input: a parameter, Triton's to check
    (b'{"text_input": "hi", "max_tokens": 2147483648}', "max_tokens must be an integer from -2147483648 to 2147483647 (INT32)"),
    (b'{"text_input": "hi", "seed": 18446744073709551616}', "seed must be an integer from 0 to 18446744073709551615"),
    (b'{"text_input": "hi", "temperature": true}', "temperature must be a number (FP32), got true"),
    (b'{"text_input": "hi", "stop": ["a", 3]}', "stop must be a string (BYTES), got 3"),
    (b"[" * 100_000, "nests JSON arrays or objects too deeply"),
    (b"\xff\xfe\x00", "the request body is not JSON"),
])
def test_the_http_guard_checks_generate_bodies_against_the_model_inputs(body, problem):
    from pipeline.serving.http_guard import generate_body_problem

    inputs = {"text_input": "BYTES", "max_tokens": "INT32", "temperature": "FP32", "seed": "UINT64", "stop": "BYTES",
              "stream": "BOOL"}
    found = generate_body_problem(body, inputs)
    assert (found is None) if problem is None else (found is not None and problem in found), found


def test_ports_picked_together_are_distinct_and_avoid_the_taken_ones(monkeypatch):
    """A port is free again once the probe socket closes, so two probes can return the same one."""
    from pipeline.serving import server

    probes = iter([5001, 5001, 5002, 5003, 5002, 5004])
    monkeypatch.setattr(server, "free_port", lambda: next(probes))
    assert server.free_ports(3, avoid=(5003,)) == [5001, 5002, 5004]
