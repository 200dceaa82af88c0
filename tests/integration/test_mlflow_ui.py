"""The MLflow UI as a reviewer sees it, rendered by headless Chromium (Debian's
chromium-headless-shell, installed here when absent as the PostgreSQL tests install PostgreSQL):
the page `kiln ui` prints opens in model-training mode with the model registry in its sidebar, the
models list shows the model with its alias and key metrics, a version page its metrics and a link
to its validation report. Each page's rendered DOM is read back as text (and a screenshot kept in
the test's folder)."""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY_RECIPE, run_kiln
from tests.stores import free_port

pytestmark = pytest.mark.integration
MODEL = "tiny-llama-int4"


def chromium() -> str:
    for name in ("chromium-headless-shell", "chromium"):
        if found := shutil.which(name):
            return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium-headless-shell) and this user cannot install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run(["apt-get", "install", "-y", "-q", "chromium-headless-shell"], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not shutil.which("chromium-headless-shell"):
        pytest.skip(f"apt-get install chromium-headless-shell failed: {proc.stderr.strip()[-300:]}")
    return shutil.which("chromium-headless-shell")


def rendered_text(browser: str, url: str, screenshot) -> str:
    """The page's DOM after its scripts ran (a fresh browser profile: a first visit), as text."""
    base = [browser, "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000", "--window-size=1400,1000"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


@pytest.fixture(scope="module")
def ui(tiny_run, tmp_path_factory):
    """The tiny recipe registered into a fresh store, version 1 promoted to staging, `kiln ui` on it."""
    browser = chromium()
    root = tmp_path_factory.mktemp("ui_store")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    run_kiln("run", str(TINY_RECIPE), artifacts=tiny_run["artifacts"], env=env, check=True)
    run_kiln("promote", MODEL, "1", "--to", "staging", artifacts=tiny_run["artifacts"], env=env, check=True)
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env |= {"KILN_ARTIFACTS": str(tiny_run["artifacts"]), **env}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "ui", "--port", str(port)], cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("MLflow UI: "), line + proc.stdout.read()
        yield browser, line.split()[2], f"http://127.0.0.1:{port}", root
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_the_printed_address_opens_with_the_model_registry_in_reach(ui):
    browser, printed, _, root = ui
    assert "workflowType=machine_learning" in printed
    text = rendered_text(browser, printed, root / "runs.png")
    assert "Model registry" in text and "tiny-llama-int4-cpu" in text, text[:800]


def test_models_list_shows_the_alias_and_key_metrics(ui):
    browser, _, base, root = ui
    text = rendered_text(browser, f"{base}/#/models", root / "models.png")
    assert MODEL in text and "@ staging" in text.replace("@staging", "@ staging"), text[:800]
    # the model's first tag, which the list shows, sums up its newest version with its key metrics
    assert "kiln.newest : v1 · rtn on onnxruntime-cpu · ppl Δ %" in text and "agreement" in text, text[:1500]


def test_a_version_page_shows_metrics_and_links_its_report(ui):
    browser, _, base, root = ui
    text = rendered_text(browser, f"{base}/#/models/{MODEL}/versions/1", root / "version.png")
    assert "Aliases : @ staging" in text and "validation passed" in text, text[:1000]
    assert "Validation report" in text and "perplexity" in text.lower(), text[:1500]


def test_the_reports_link_opens_the_run_in_model_training_mode(ui):
    from mlflow import MlflowClient

    browser, _, base, root = ui
    uri = f"sqlite:///{root / 'mlflow.db'}"
    description = MlflowClient(uri, uri).get_model_version(MODEL, "1").description
    [link] = re.findall(r"\[Validation report\]\(([^)]+)\)", description)
    text = rendered_text(browser, f"{base}/{link}", root / "report.png")
    assert "Model registry" in text and "validation/report.html" in text and "Evaluation runs" not in text, text[:1000]


def test_the_run_page_lists_its_logged_model(ui):
    """The run's Overview shows the engine it logged under "Logged models" (an MLflow 3 LoggedModel,
    which the version is registered from), not "—"."""
    from mlflow import MlflowClient

    browser, _, base, root = ui
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mv = MlflowClient(uri, uri).get_model_version(MODEL, "1")
    run = MlflowClient(uri, uri).get_run(mv.run_id)
    text = rendered_text(browser, f"{base}/#/experiments/{run.info.experiment_id}/runs/{mv.run_id}?workflowType=machine_learning",
                         root / "run.png")
    # its row: name, status and the registered version it became
    assert re.search(rf"Logged models \(1\).*? {MODEL} Ready .*? {MODEL} v1\b", text), text[text.find("Logged models"):][:800]
