"""A `kiln run` killed with SIGKILL mid-stage leaves no debris: no temporary folder outside the
runner's scheme (cleaned by the next run) and no orphaned child process."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_RECIPE, run_kiln

pytestmark = pytest.mark.integration

# Runs `kiln run` in-process with one function replaced by a self-SIGKILL at that point.
KILLED_RUN = """
import os, signal, sys
import {module} as target
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
target.{function} = die
from pipeline.cli import main
sys.argv = ["kiln", "run", {recipe!r}]
main()
"""


def killed_run(artifacts: Path, module: str, function: str) -> subprocess.CompletedProcess:
    script = KILLED_RUN.format(module=module, function=function, recipe=str(TINY_RECIPE))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"KILN_ARTIFACTS": str(artifacts)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stdout + proc.stderr  # it really was killed
    return proc


def test_sigkill_during_build_leaves_nothing_the_next_run_keeps(tmp_path):
    killed_run(tmp_path, "pipeline.targets.onnxruntime_ep", "check_fusion")
    build_dir = tmp_path / "cache" / "build"
    leftovers = list(build_dir.iterdir())
    assert leftovers and all(p.name.startswith(".tmp-") for p in leftovers), leftovers  # the runner's scheme only
    run_kiln("run", str(TINY_RECIPE), artifacts=tmp_path, check=True)
    assert not [p for p in build_dir.iterdir() if p.name.startswith((".tmp", "tmp"))]


LATENCY_KILL = """
import os, signal, subprocess, sys
real_run = subprocess.run
def run(cmd, *args, **kwargs):
    if "pipeline.latency" not in cmd:
        return real_run(cmd, *args, **kwargs)
    # start the latency child exactly as Kiln asks (its preexec_fn included), then die with SIGKILL
    kwargs.pop("capture_output", None)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=kwargs.get("preexec_fn"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    open({pid_file!r}, "w").write(str(child.pid))
    os.kill(os.getpid(), signal.SIGKILL)
subprocess.run = run
from pipeline.cli import main
sys.argv = ["kiln", "run", {recipe!r}]
main()
"""


def test_sigkill_during_validate_kills_the_latency_child(tmp_path):
    pid_file = tmp_path / "child.pid"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"KILN_ARTIFACTS": str(tmp_path)}
    script = LATENCY_KILL.format(pid_file=str(pid_file), recipe=str(TINY_RECIPE))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stdout + proc.stderr
    pid = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        raise AssertionError("the latency child outlived its killed parent")
    run_kiln("run", str(TINY_RECIPE), artifacts=tmp_path, check=True)
    assert json.loads((tmp_path / "last_run.json").read_text())["registered"]["version"] == "1"


def test_a_run_killed_after_registering_registers_nothing_new_when_rerun(tmp_path):
    """SIGKILL right after MLflow created the version, before Kiln recorded it: the re-run finds the
    version made for this build (its register key) and reuses it."""
    from mlflow import MlflowClient

    killed_run(tmp_path, "pipeline.stages.register", "write_json_atomic")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert len(client.search_model_versions("name = 'tiny-llama-int4'")) == 1
    proc = run_kiln("run", str(TINY_RECIPE), artifacts=tmp_path, check=True)
    assert "already registers this build" in proc.stdout
    assert len(client.search_model_versions("name = 'tiny-llama-int4'")) == 1
    assert json.loads((tmp_path / "last_run.json").read_text())["registered"]["version"] == "1"


def test_two_concurrent_runs_of_one_recipe_register_one_version_and_both_say_which(tmp_path):
    import re

    from mlflow import MlflowClient

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"KILN_ARTIFACTS": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(TINY_RECIPE)], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    said = [re.findall(r"MLflow: tiny-llama-int4 version (\d+)", " ".join(out.split())) for out in outputs]
    assert said == [["1"], ["1"]], outputs
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert len(MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions("name = 'tiny-llama-int4'")) == 1
