"""Shared fixtures. The tiny recipe runs once per session through the real CLI; unit tests then
inspect its artifacts instead of rebuilding them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "tiny-llama-int4-cpu.yaml"


def run_kiln(*args: str, artifacts: Path, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """The real console entry point, in a subprocess, with its own artifacts root and store."""
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # tests pick their store
    full_env.update({"KILN_ARTIFACTS": str(artifacts), **(env or {})})
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"kiln {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def untracked_files() -> set[str]:
    proc = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True, text=True)
    return {line[3:] for line in proc.stdout.splitlines() if line.startswith("??")} if proc.returncode == 0 else set()


@pytest.fixture(scope="session", autouse=True)
def repo_stays_clean():
    """Every test writes under tmp: a file left in the checkout (an MLflow default store such as
    ./mlflow.db or ./mlruns once was) fails the session instead of being committed by accident."""
    before = untracked_files()
    yield
    left = sorted(untracked_files() - before)
    assert not left, f"the test session left files in the checkout: {left}"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    """One full run of the tiny recipe: returns the run summary (stages, metrics, registration)."""
    artifacts = tmp_path_factory.mktemp("tiny_artifacts")
    proc = run_kiln("run", str(TINY_RECIPE), artifacts=artifacts, check=True)
    summary = json.loads((artifacts / "last_run.json").read_text())
    summary["output"] = proc.stdout + proc.stderr  # everything `kiln run` printed
    summary["artifacts"] = artifacts
    summary["paths"] = {s["stage"]: Path(s["path"]) for s in summary["stages"]}
    return summary
