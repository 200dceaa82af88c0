"""The runner's contract, on toy stages that write small files: cache keys, reuse, atomic
publication, failure isolation and the plan."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
from rich.console import Console

from pipeline.artifacts import Artifact, publish_dir, read_manifest, verify
from pipeline.errors import IntegrityError, StageFailed
from pipeline.runner import RunContext, Runner, StageSpec, stage_key
from pipeline.settings import Settings


@dataclass(frozen=True)
class Cfg:
    value: int

    def model_dump(self, **_):
        return {"value": self.value}


def make_ctx(tmp_path, code="v1") -> RunContext:
    return RunContext(Settings.from_env(tmp_path / "artifacts"), Console(quiet=True), code)


def writer(calls: list[str], name: str):
    def run(cfg, *inputs, ctx):
        calls.append(name)
        upstream = "".join((a.path / "out.txt").read_text() for a in inputs)
        (ctx.out_dir / "out.txt").write_text(f"{upstream}{name}={cfg.value};")
        return Artifact(path=ctx.out_dir, meta={"value": cfg.value})

    return run


def specs(calls, a=1, b=2, fail_b=False):
    def failing(cfg, *inputs, ctx):
        (ctx.out_dir / "partial.txt").write_text("half written")
        raise RuntimeError("boom")

    return [
        StageSpec("a", writer(calls, "a"), Artifact, Cfg(a)),
        StageSpec("b", failing if fail_b else writer(calls, "b"), Artifact, Cfg(b), ("a",)),
    ]


def test_second_run_reuses_everything(tmp_path):
    calls: list[str] = []
    first = Runner(make_ctx(tmp_path), specs(calls)).run()
    second = Runner(make_ctx(tmp_path), specs(calls)).run()
    assert calls == ["a", "b"]
    assert [o.status for o in first] == ["built", "built"]
    assert [o.status for o in second] == ["reused", "reused"]
    assert (second[1].artifact.path / "out.txt").read_text() == "a=1;b=2;"
    assert second[1].artifact.digest == first[1].artifact.digest


def test_changing_a_downstream_config_rebuilds_only_downstream(tmp_path):
    calls: list[str] = []
    Runner(make_ctx(tmp_path), specs(calls)).run()
    out = Runner(make_ctx(tmp_path), specs(calls, b=3)).run()
    assert [o.status for o in out] == ["reused", "built"]
    assert calls == ["a", "b", "b"]


def test_upstream_content_and_code_version_change_keys(tmp_path):
    calls: list[str] = []
    Runner(make_ctx(tmp_path), specs(calls)).run()
    out = Runner(make_ctx(tmp_path), specs(calls, a=5)).run()
    assert [o.status for o in out] == ["built", "built"]
    out = Runner(make_ctx(tmp_path, code="v2"), specs(calls, a=5)).run()
    assert [o.status for o in out] == ["built", "built"]


def test_key_depends_on_config_inputs_and_code():
    spec = StageSpec("s", lambda *a, **k: None, Artifact, Cfg(1), ("up",))
    up = {"up": Artifact(path=None, digest="d1")}
    base = stage_key(spec, up, "v1")
    assert base == stage_key(spec, up, "v1")
    assert base != stage_key(StageSpec("s", spec.run, Artifact, Cfg(2), ("up",)), up, "v1")
    assert base != stage_key(spec, {"up": Artifact(path=None, digest="d2")}, "v1")
    assert base != stage_key(spec, up, "v2")
    assert base != stage_key(StageSpec("s", spec.run, Artifact, Cfg(1), ("up",), key_extra={"uri": "x"}), up, "v1")


def test_failed_stage_keeps_finished_stages_and_leaves_no_partial_output(tmp_path):
    calls: list[str] = []
    with pytest.raises(StageFailed, match="stage 'b' failed: RuntimeError: boom") as e:
        Runner(make_ctx(tmp_path), specs(calls, fail_b=True)).run()
    log = e.value.reason.split("full traceback: ")[1].rstrip(")")
    assert "in failing" in open(log).read()  # the whole traceback is kept for the user
    cache = tmp_path / "artifacts" / "cache"
    assert list((cache / "b").iterdir()) == []  # neither a final folder nor a temp folder
    out = Runner(make_ctx(tmp_path), specs(calls)).run()
    assert [o.status for o in out] == ["reused", "built"]


def test_plan_reports_reuse_and_build_without_running(tmp_path):
    calls: list[str] = []
    Runner(make_ctx(tmp_path), specs(calls)).run()
    rows = Runner(make_ctx(tmp_path), specs(calls, b=9)).plan()
    assert [(r.name, r.action) for r in rows] == [("a", "reuse"), ("b", "build")]
    rows = Runner(make_ctx(tmp_path), specs(calls, a=9)).plan()
    assert [(r.name, r.action, r.key) for r in rows] == [("a", "build", rows[0].key), ("b", "build", None)]
    assert calls == ["a", "b"]


def test_manifest_lists_every_file_and_detects_tampering(tmp_path):
    out = Runner(make_ctx(tmp_path), specs([])).run()
    folder = out[1].artifact.path
    manifest = read_manifest(folder)
    assert set(manifest["files"]) == {"out.txt"} and manifest["config"] == {"value": 2}
    verify(folder)
    (folder / "out.txt").write_text("tampered")
    with pytest.raises(IntegrityError, match="sha256 mismatch: out.txt"):
        verify(folder)
    (folder / "extra.bin").write_bytes(b"x")
    with pytest.raises(IntegrityError, match="unlisted file extra.bin"):
        verify(folder)


def test_stale_temp_folder_of_a_killed_run_is_removed(tmp_path):
    calls: list[str] = []
    Runner(make_ctx(tmp_path), specs(calls)).run()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "artifacts" / "cache" / "b" / f".tmp-somekey-{int(dead.stdout)}"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x")
    live = tmp_path / "artifacts" / "cache" / "b" / f".tmp-otherkey-{os.getpid()}"
    live.mkdir()
    Runner(make_ctx(tmp_path), specs(calls, b=7)).run()
    assert not stale.exists()
    assert live.exists()  # another live run's work in progress is left alone


def test_publish_keeps_the_first_finished_copy(tmp_path):
    final = tmp_path / "final"
    first, second = tmp_path / "t1", tmp_path / "t2"
    for d, text in ((first, "one"), (second, "two")):
        d.mkdir()
        (d / "manifest.json").write_text(text)
    publish_dir(first, final)
    publish_dir(second, final)
    assert (final / "manifest.json").read_text() == "one" and not second.exists()


def test_check_hook_runs_after_reuse_too(tmp_path):
    seen = []
    s = specs([])
    s[1] = StageSpec("b", s[1].run, Artifact, Cfg(2), ("a",), check=lambda a: seen.append(a.meta["value"]))
    Runner(make_ctx(tmp_path), s).run()
    Runner(make_ctx(tmp_path), s).run()
    assert seen == [2, 2]


def test_damaged_cache_entry_is_set_aside_and_rebuilt(tmp_path):
    calls: list[str] = []
    first = Runner(make_ctx(tmp_path), specs(calls)).run()
    (first[0].artifact.path / "out.txt").unlink()  # someone deleted a file inside the cache
    out = Runner(make_ctx(tmp_path), specs(calls)).run()
    assert [o.status for o in out] == ["built", "reused"]  # same content again, so b's key holds
    assert calls == ["a", "b", "a"]
    damaged = list((tmp_path / "artifacts" / "cache" / "a").glob(".damaged-*"))
    assert len(damaged) == 1 and (damaged[0] / "manifest.json").is_file()


def stage_keys(tmp_path) -> dict[str, str]:
    from pipeline.plan import stages_for
    from pipeline.recipe import load_recipe
    from tests.conftest import ROOT, TINY_RECIPE

    specs = stages_for(load_recipe(TINY_RECIPE), make_ctx(tmp_path), lambda _m: None, ROOT)
    return {s.name: s.code for s in specs}


def test_a_stage_is_keyed_on_the_code_it_runs_not_the_whole_package(tmp_path, monkeypatch):
    """Editing the decode engine changes the keys of the stages that run or ship it and no build stage's; editing the
    quantizer changes quantize's and not source's."""
    from pipeline import hashing

    before = stage_keys(tmp_path)
    real = hashing.Path.read_bytes
    edited = {"engine/scheduler.py"}

    def read_bytes(path):
        data = real(path)
        rel = path.relative_to(hashing.PACKAGE_ROOT).as_posix() if path.is_relative_to(hashing.PACKAGE_ROOT) else ""
        return data + b"\n# edited\n" if rel in edited else data

    monkeypatch.setattr(hashing.Path, "read_bytes", read_bytes)
    after = stage_keys(tmp_path)
    # validate times it (latency), the package stage copies it into the Triton model, register into the MLflow model
    assert {n for n in before if before[n] != after[n]} == {"validate", "package", "register"}
    edited.clear()
    edited.add("quantization/rtn.py")
    after = stage_keys(tmp_path)
    changed = {n for n in before if before[n] != after[n]}
    assert "quantize" in changed and "source" not in changed and "package" not in changed
    edited.clear()
    edited.add("serving/triton_model.py")  # copied into the package as a file, never imported
    after = stage_keys(tmp_path)
    assert {n for n in before if before[n] != after[n]} == {"package"}
    edited.clear()
    edited.add("serving/pyfunc_model.py")  # the MLflow model's code, copied by register
    after = stage_keys(tmp_path)
    assert {n for n in before if before[n] != after[n]} == {"register"}


def test_each_built_stage_records_its_peak_memory_and_disk(tmp_path):
    from pipeline.artifacts import read_manifest

    out = Runner(make_ctx(tmp_path), specs([])).run()
    for outcome in out:
        resources = read_manifest(outcome.artifact.path)["resources"]
        assert resources["peak_rss_mb"] > 0
        written = sum(p.stat().st_size for p in outcome.artifact.path.iterdir() if p.name != "manifest.json") / 1e6
        assert resources["disk_written_mb"] == pytest.approx(written, abs=0.01) and resources["disk_linked_mb"] == 0
