"""The registry from a user's seat, through the real CLI: two builds registered, gated promotion to
staging and production, the challenger comparison, forced promotion, rollback, browsing, loading by
`models:/` URI, and integrity checks, against each store a team uses: the embedded sqlite file, a
real `mlflow server` over HTTP, and a server backed by PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT, TINY_RECIPE, run_kiln
from tests.stores import mlflow_server, postgres_database

pytestmark = pytest.mark.integration
MODEL = "tiny-llama-int4"


@pytest.fixture(scope="module", params=["sqlite", "server", "postgres"])
def store(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"store_{request.param}")
    if request.param == "sqlite":
        yield f"sqlite:///{root / 'mlflow.db'}"
    elif request.param == "server":
        with mlflow_server(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", root / "server.log") as url:
            yield url
    else:
        with postgres_database() as db, mlflow_server(db, root / "artifacts", root / "server.log") as url:
            yield url


@pytest.fixture(scope="module")
def flow(store, tiny_run):
    """Two versions of the tiny model in `store`: v1 float (method none), v2 RTN int4. v2 agrees
    with the source on fewer next tokens (0.68 vs 1.0), which the production comparison catches."""
    env = {"MLFLOW_TRACKING_URI": store}

    def kiln(*args: str) -> subprocess.CompletedProcess:
        return run_kiln(*args, artifacts=tiny_run["artifacts"], env=env)

    for overrides in (["--set", "quantize.method=none"], []):
        proc = kiln("run", str(TINY_RECIPE), *overrides)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return kiln


def mlflow_client(store: str) -> MlflowClient:
    return MlflowClient(tracking_uri=store, registry_uri=store)


def production(client) -> str:
    return str(client.get_model_version_by_alias(MODEL, "production").version)  # int from sqlite, str over HTTP


def audit(store: str, version: str) -> list[dict]:
    from pipeline.registry.promotion import audit_log

    client = mlflow_client(store)
    return audit_log(client, client.get_model_version(MODEL, version))


def test_promotion_rollback_and_audit(flow, store):
    client = mlflow_client(store)
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{MODEL}'"))
    assert versions == [1, 2]

    direct = flow("promote", MODEL, "2", "--to", "production")
    assert direct.returncode == 7 and "is not on staging" in direct.stdout, direct.stdout

    for version, alias in (("1", "staging"), ("1", "production"), ("2", "staging")):
        proc = flow("promote", MODEL, version, "--to", alias)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert production(client) == "1"

    challenger = flow("promote", MODEL, "2", "--to", "production")
    assert challenger.returncode == 7, challenger.stdout
    out = challenger.stdout
    assert "champion v1" in out and "challenger v2" in out and "next-token agreement worse by" in out
    assert "regressed" in out  # both versions' numbers side by side, the regressed row marked
    assert production(client) == "1"
    refused = audit(store, "2")[-1]
    assert refused["result"] == "refused" and refused["previous_version"] == "1" and refused["by"]
    rows = {r["metric"]: r for r in refused["comparison"]}
    assert rows["next_token_agreement"]["champion"] == pytest.approx(1.0, abs=0.02) and not rows["next_token_agreement"]["passed"]
    # each event is one JSON artifact of the version's run, with a short tag on the version; none
    # of them a long tag that sorts before the lineage
    mv2 = client.get_model_version(MODEL, "2")
    assert not [k for k in mv2.tags if k.startswith("kiln.audit.")]
    assert mv2.tags["kiln.last_audit"].split(" ", 1)[1].startswith("promote @production refused by ")
    files = [a.path for a in client.list_artifacts(mv2.run_id, "audit")]
    assert len(files) == len(audit(store, "2")) and all(f.endswith("-v2.json") for f in files)
    # the models list shows every alias through one registered-model tag
    assert client.get_registered_model(MODEL).tags["kiln.aliases"] == "@production → v1, @staging → v2"

    forced = flow("promote", MODEL, "2", "--to", "production", "--force")
    assert forced.returncode == 0 and "forced" in forced.stdout, forced.stdout
    assert production(client) == "2"
    assert audit(store, "2")[-1]["result"] == "forced"

    back = flow("rollback", MODEL)
    assert back.returncode == 0 and "version 1 (rolled back from version 2)" in back.stdout, back.stdout
    assert production(client) == "1"
    assert audit(store, "2")[-1]["action"] == "rollback" and audit(store, "1")[-1]["previous_version"] == "2"
    assert client.get_registered_model(MODEL).tags["kiln.aliases"] == "@production → v1, @staging → v2"
    again = flow("rollback", MODEL)
    assert again.returncode == 7 and "nothing to roll back to" in again.stdout, again.stdout  # refused, not "not found"

    # every event above (refused ones too) is one link of the model's audit chain
    events = audit(store, "1") + audit(store, "2")
    checked = flow("audit", "verify", f"models:/{MODEL}")
    assert checked.returncode == 0 and f"{len(events)} records, chain intact" in checked.stdout, checked.stdout
    assert sorted(e["seq"] for e in events) == list(range(1, len(events) + 1))
    missing = flow("audit", "verify", "models:/no-such-model")
    assert missing.returncode == 8 and "no registered model 'no-such-model'" in missing.stdout, missing.stdout + missing.stderr
    head = client.get_registered_model(MODEL).tags["kiln.audit_head"]
    client.set_registered_model_tag(MODEL, "kiln.audit_head", head.replace(json.loads(head)["hash"], "0" * 64))
    cut = flow("audit", "verify", f"models:/{MODEL}")
    assert cut.returncode == 6 and "cut from its end" in cut.stdout, cut.stdout
    client.set_registered_model_tag(MODEL, "kiln.audit_head", head)
    if store.startswith("sqlite:///"):  # the artifacts are files beside the database: edit one
        [first] = [p for p in Path(store.removeprefix("sqlite:///")).parent.rglob("*.json") if '"seq": 1,' in p.read_text()]
        original = first.read_text()
        first.write_text(original.replace('"by": "', '"by": "someone else, not '))
        edited = flow("audit", "verify", f"models:/{MODEL}")
        first.write_text(original)
        assert edited.returncode == 6 and "event 1 (record seq 1): edited" in edited.stdout, edited.stdout


def test_browse_and_load_by_uri(flow, store, tmp_path):
    from pipeline.modeling.runtime import greedy_decode
    from pipeline.targets import get_target

    for alias in ("staging", "production"):  # idempotent: the state the promotion test leaves, or set here
        if flow("models", "show", f"{MODEL}@{alias}").returncode != 0:
            flow("promote", MODEL, "1", "--to", alias)
    listing = flow("models", "list")
    assert listing.returncode == 0 and MODEL in listing.stdout and "@production→" in listing.stdout, listing.stdout
    table = flow("models", "show", MODEL)
    assert table.returncode == 0 and "agreement" in table.stdout and "@production" in table.stdout, table.stdout
    one = flow("models", "show", f"models:/{MODEL}@production")
    assert one.returncode == 0 and "kiln.recipe_sha256" in one.stdout and "engine_size_mb" in one.stdout, one.stdout
    assert "audit:" in one.stdout
    mv = mlflow_client(store).get_model_version(MODEL, "2")
    assert mv.description.startswith("**tiny-llama-int4-cpu**: rtn on onnxruntime-cpu; validation passed.")
    assert "next-token agreement" in mv.description and "Lineage: recipe `" in mv.description  # what the version page shows first
    missing = flow("models", "show", f"{MODEL}@nope")
    assert missing.returncode == 8 and "has no alias @nope" in missing.stdout

    pulled = flow("models", "pull", f"models:/{MODEL}@production", "--dest", str(tmp_path / "prod"))
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    paths = json.loads(pulled.stdout)  # stdout is the JSON line alone; what happened goes to stderr
    assert "sha256 verified" in pulled.stderr and f"kiln serve {tmp_path / 'prod'}" in " ".join(pulled.stderr.split())
    from pipeline.serving.commands import local_repository

    assert local_repository(tmp_path / "prod") == Path(paths["triton_repository"])  # whole package, verified
    newest = flow("models", "pull", MODEL, "--dest", str(tmp_path / "newest"))
    assert newest.returncode == 0 and "no version or alias given, taking the newest" in newest.stderr, newest.stderr
    engine_dir = Path(paths["engine_dir"])
    meta = json.loads((engine_dir / "manifest.json").read_text())["meta"]
    lm = get_target(meta["target"]).load(engine_dir, meta)
    tokens, _, _ = greedy_decode(lm, np.array([1, 2, 3], dtype=np.int64), 4, lambda: 0.0)
    assert len(tokens) == 4
    assert (Path(paths["validation_dir"]) / "latency_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diff_shows_two_versions_side_by_side(flow, store):
    out = flow("models", "diff", f"{MODEL}/1", f"{MODEL}/2")
    assert out.returncode == 0, out.stdout + out.stderr
    text = " ".join(out.stdout.split())
    assert "metrics: tiny-llama-int4 v2 vs tiny-llama-int4 v1" in text and "next-token agreement" in text
    assert "max_ppl_increase_pct" in text  # both versions' gates
    assert "quantize.method │ none │ rtn" in text and "kiln.quant_method │ none │ rtn" in text  # recipe and lineage
    as_json = flow("models", "diff", f"models:/{MODEL}/1", f"{MODEL}/2", "--json")
    doc = json.loads(as_json.stdout)
    rows = {m["metric"]: m for m in doc["metrics"]}
    assert rows["next_token_agreement"]["verdict"] == "worse" and rows["next_token_agreement"]["a"] == pytest.approx(1.0, abs=0.02)
    # each evaluation text's figures too (issue 25), from the metrics the versions' runs logged
    for text in ("package-readmes", "licenses"):
        row = rows[f"eval/{text}/ppl_increase_pct"]
        assert row["label"] == f"perplexity increase vs source ({text})" and row["a"] is not None and row["b"] > row["a"]
    assert {"setting": "quantize.method", "a": "none", "b": "rtn"} in doc["recipe"]
    assert all(g["a_passed"] is not None for g in doc["gates"])
    bad = flow("models", "diff", f"{MODEL}/1", f"{MODEL}/9")
    assert bad.returncode == 8 and "has no version 9" in bad.stdout


def test_each_version_has_a_self_contained_html_report(flow, store, tmp_path):
    import mlflow.artifacts

    client = mlflow_client(store)
    mv = client.get_model_version(MODEL, "2")
    page = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="validation/report.html", dst_path=str(tmp_path),
                                                    tracking_uri=store)).read_text()
    assert '<img alt="latency and accuracy"' in page and 'src="data:image/png;base64,iVBORw0KGgo' in page  # the plot inside
    assert f"{client.get_run(mv.run_id).data.metrics['engine_ppl']:.3f}" in page and "max_ppl_increase_pct" in page
    assert "latency_accuracy.png" not in page  # nothing it links to


def test_failed_validation_and_tampered_artifacts_are_refused(flow, store, tiny_run):
    proc = flow("run", str(TINY_RECIPE), "--set", "validate.gates.min_next_token_agreement=0.99",
                "--set", "validate.on_gate_failure=warn")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    failed_version = json.loads((tiny_run["artifacts"] / "last_run.json").read_text())["registered"]["version"]
    refused = flow("promote", MODEL, failed_version, "--to", "staging")
    assert refused.returncode == 7 and "validation did not pass (gates missed: min_next_token_agreement)" in refused.stdout
    if not store.startswith("sqlite:///"):
        return  # the files of a server's artifact store are the server's to keep
    source = mlflow_client(store).get_model_version_download_uri(MODEL, "2")
    onnx_file = Path(source.removeprefix("file://")) / "artifacts" / "engine" / "engine.onnx"  # inside the MLflow model
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    tampered = flow("promote", MODEL, "2", "--to", "staging", "--force")
    assert tampered.returncode == 6 and "sha256 mismatch: engine.onnx" in tampered.stdout, tampered.stdout


def test_concurrent_runs_both_register(tiny_run, tmp_path):
    """Two `kiln run`s registering into one embedded store at the same moment: both land, distinct versions."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": store, "KILN_ARTIFACTS": str(tiny_run["artifacts"])}
    import os

    full_env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, **env}
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(TINY_RECIPE), *extra], cwd=ROOT, env=full_env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for extra in ([], ["--set", "quantize.method=none"])]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    client = mlflow_client(store)
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
    assert {client.get_run(v.run_id).info.status for v in versions} == {"FINISHED"}
    assert {v.tags["kiln.quant_method"] for v in versions} == {"rtn", "none"}


def test_kiln_ui_serves_versions_and_artifacts(tiny_run):
    """`kiln ui` on the embedded store: the registry and a version's report figure over HTTP."""
    import os
    import threading
    import time
    import urllib.request

    from tests.stores import free_port

    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "KILN_ARTIFACTS": str(tiny_run["artifacts"])}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "ui", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def get(path: str) -> bytes:
        with urllib.request.urlopen(url + path, timeout=10) as r:
            return r.read()

    # What a user waits for is the printed URL: read it
    # before asking anything, so the checks never race kiln's own health wait.
    lines: list[str] = []

    def read_output() -> None:
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any(line.startswith(f"MLflow UI: {url}") for line in list(lines)):
            assert proc.poll() is None and time.monotonic() < deadline, f"kiln ui did not start: {''.join(lines)[-2000:]}"
            time.sleep(0.2)
        assert lines[0].startswith(f"MLflow UI: {url}"), lines  # the URL first, not after the server's warnings
        get("/health")
        models = json.loads(get("/ajax-api/2.0/mlflow/registered-models/search"))
        assert MODEL in [m["name"] for m in models["registered_models"]]
        run_id = tiny_run["registered"]["run_id"]
        listing = json.loads(get(f"/ajax-api/2.0/mlflow/artifacts/list?run_uuid={run_id}&path=validation"))
        assert "validation/latency_accuracy.png" in [f["path"] for f in listing["files"]]
        png = get(f"/get-artifact?path=validation/latency_accuracy.png&run_uuid={run_id}")
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        reader.join(timeout=60)
    assert proc.returncode == 0, "".join(lines)[-2000:]
