"""Registry logic without a store: model references and the challenger-vs-champion comparison."""

from __future__ import annotations

import pytest

from pipeline.errors import RegistryError
from pipeline.recipe import PromoteConfig
from pipeline.registry.promotion import Decision, compare
from pipeline.registry.refs import VersionRef


@pytest.mark.parametrize("text, expected", [
    ("m", VersionRef("m")),
    ("m/3", VersionRef("m", version="3")),
    ("m@production", VersionRef("m", alias="production")),
    ("models:/smollm2-135m-int4@staging", VersionRef("smollm2-135m-int4", alias="staging")),
    ("models:/m/12", VersionRef("m", version="12")),
])
def test_references_parse(text, expected):
    ref = VersionRef.parse(text)
    assert ref == expected
    assert VersionRef.parse(ref.uri) == ref


@pytest.mark.parametrize("bad", ["", "m@", "m/x", "models:/", "m/3@prod", "a b"])
def test_bad_references_say_the_forms(bad):
    with pytest.raises(RegistryError, match="use NAME, NAME/VERSION, NAME@ALIAS or models:/NAME@ALIAS"):
        VersionRef.parse(bad)


CHAMPION = {"engine_ppl": 22.0, "next_token_agreement": 0.84, "tokens_per_s": 70.0, "ttft_ms": 100.0}


def test_equal_versions_pass_and_changes_are_signed_worse_positive():
    rows = compare(CHAMPION, CHAMPION, PromoteConfig())
    assert all(r.passed and r.change == 0 for r in rows)
    better = {"engine_ppl": 21.0, "next_token_agreement": 0.9, "tokens_per_s": 80.0, "ttft_ms": 90.0}
    assert all(r.change < 0 and r.passed for r in compare(better, CHAMPION, PromoteConfig()))


def test_each_limit_refuses_its_own_regression():
    policy = PromoteConfig(max_ppl_increase_pct=1, max_agreement_drop=0.01, max_tokens_per_s_drop_pct=10, max_ttft_increase_pct=25)
    worse = {"engine_ppl": 22.0 * 1.02, "next_token_agreement": 0.82, "tokens_per_s": 70.0 * 0.85, "ttft_ms": 130.0}
    rows = {r.metric: r for r in compare(worse, CHAMPION, policy)}
    assert rows["engine_ppl"].change == pytest.approx(2.0) and not rows["engine_ppl"].passed
    assert rows["next_token_agreement"].change == pytest.approx(0.02) and not rows["next_token_agreement"].passed
    assert rows["tokens_per_s"].change == pytest.approx(15.0) and not rows["tokens_per_s"].passed
    assert rows["ttft_ms"].change == pytest.approx(30.0) and not rows["ttft_ms"].passed
    within = {"engine_ppl": 22.0 * 1.005, "next_token_agreement": 0.835, "tokens_per_s": 66.0, "ttft_ms": 120.0}
    assert all(r.passed for r in compare(within, CHAMPION, policy))


def test_decision_lists_problems_and_regressions():
    d = Decision("m", "2", "production", "1", problems=["version 2 is not on staging"],
                 comparison=compare({**CHAMPION, "engine_ppl": 30.0}, CHAMPION, PromoteConfig()))
    assert not d.allowed
    assert d.reasons()[0] == "version 2 is not on staging"
    assert d.reasons()[1].startswith("perplexity (held-out) worse by 36.4 %")
    assert Decision("m", "2", "staging", None).allowed


def test_version_plot_has_a_log_speed_axis_and_labels_that_do_not_overlap():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.registry.browse import plot_accuracy_vs_speed

    # twelve versions, CPU builds near 54 tok/s and GPU builds near 4300 tok/s, close in accuracy
    records = [{"model": "smollm2-135m-int4", "version": v, "aliases": "@staging" if v == 3 else "", "target": target,
                "tokens_per_s": speed * (1 + 0.01 * v), "ppl_increase_pct": 7.5 + 0.05 * v}
               for v, (target, speed) in enumerate([("onnxruntime-cpu", 54.0)] * 6 + [("tensorrt", 4300.0)] * 6, start=1)]
    fig, ax = plt.subplots(figsize=(8, 5))
    labels = plot_accuracy_vs_speed(ax, records)
    assert ax.get_xscale() == "log" and len(labels) == 12
    renderer = fig.canvas.get_renderer()
    boxes = [label.get_window_extent(renderer) for label in labels]
    assert not [(i, j) for i in range(12) for j in range(i + 1, 12) if boxes[i].overlaps(boxes[j])]
    plt.close(fig)


@pytest.mark.parametrize("env,expected", [
    ({"MLFLOW_TRACKING_USERNAME": "ci", "GITHUB_ACTOR": "alice"}, "ci (for alice)"),  # the server-checked identity first
    ({"MLFLOW_TRACKING_USERNAME": "ci"}, "ci"),
    ({"GITHUB_ACTOR": "alice"}, "alice"),
    ({"MLFLOW_TRACKING_USERNAME": "alice", "GITHUB_ACTOR": "alice"}, "alice"),
])
def test_promotions_are_recorded_as_the_identity_the_server_checked(monkeypatch, env, expected):
    from pipeline.settings import actor_from_env

    for key in ("MLFLOW_TRACKING_USERNAME", "GITHUB_ACTOR"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert actor_from_env() == expected


def test_a_server_refusal_names_the_identity_and_anything_else_passes_through(monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, RESOURCE_DOES_NOT_EXIST

    from pipeline.registry.store import access_denied

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    denied = access_denied(MlflowException("Permission denied", error_code=PERMISSION_DENIED))
    assert denied is not None and denied.exit_code == 11 and "did not allow this change for user 'reader'" in str(denied)
    assert access_denied(MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST)) is None
    assert access_denied(ValueError("bug")) is None


def test_kiln_ui_on_a_copied_store_is_refused_in_one_line(tmp_path):
    """`kiln ui` on a copied embedded store: the one-line StoreMoved refusal with exit 6 that
    `kiln run` and `kiln promote` give, not a traceback."""
    import shutil

    from mlflow import MlflowClient

    from tests.conftest import run_kiln

    original, copy = tmp_path / "original", tmp_path / "copy"
    original.mkdir()
    copy.mkdir()
    uri = f"sqlite:///{original / 'mlflow.db'}"
    MlflowClient(uri, uri).create_experiment("kiln", artifact_location=(original / "mlruns").as_uri())
    shutil.copy(original / "mlflow.db", copy / "mlflow.db")
    proc = run_kiln("ui", "--port", "1", artifacts=copy)
    output = " ".join((proc.stdout + proc.stderr).split())  # as Rich wrapped it, unwrapped
    assert proc.returncode == 6, output
    assert "was copied or moved" in output and "Traceback" not in output


@pytest.mark.parametrize("command", [["models", "list"], ["serve", "models:/m"], ["promote", "m", "1", "--to", "staging"]])
def test_a_store_that_does_not_answer_is_one_line_not_a_traceback(tmp_path, command):
    from tests.conftest import run_kiln

    proc = run_kiln(*command, "--tracking-uri", "http://127.0.0.1:1", artifacts=tmp_path, env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    output = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 8, output
    assert "the MLflow store does not answer" in output and "Traceback" not in output
