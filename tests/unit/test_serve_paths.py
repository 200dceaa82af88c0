"""`kiln serve` checks the whole package's manifest whichever of its folders it is given."""

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
