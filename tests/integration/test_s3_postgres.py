"""The team store of docs/deploy.md for real: `mlflow server` with a PostgreSQL backend store and an
S3 artifact store (moto's server mode on 127.0.0.1, the S3 API boto3 speaks to AWS or MinIO),
artifacts proxied by the server. Register, promote, rollback, pull and serve all go through it, and
the engine's bytes are in the bucket."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import TINY_RECIPE, run_kiln
from tests.stores import free_port, mlflow_server, postgres_database

pytestmark = pytest.mark.integration
MODEL = "tiny-llama-int4"
BUCKET = "kiln-artifacts"


@pytest.fixture(scope="module")
def s3_endpoint():
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        pytest.skip(f"moto[server] and boto3 come with the test extra (pip install -e .[test]); not installed: {e}")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=url, aws_access_key_id="kiln-test", aws_secret_access_key="kiln-test",
                     region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def team_store(s3_endpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("s3_postgres")
    # only the server holds bucket credentials: Kiln's clients upload and download through it
    server_env = {"AWS_ACCESS_KEY_ID": "kiln-test", "AWS_SECRET_ACCESS_KEY": "kiln-test", "AWS_DEFAULT_REGION": "us-east-1",
                  "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    with postgres_database() as db, mlflow_server(db, f"s3://{BUCKET}/mlflow", root / "server.log", extra_env=server_env) as url:
        yield url


def bucket_keys(endpoint: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="kiln-test", aws_secret_access_key="kiln-test",
                      region_name="us-east-1")
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def test_register_promote_rollback_pull_and_load_through_s3_and_postgres(team_store, s3_endpoint, tiny_run, tmp_path, monkeypatch):
    def kiln(*args: str) -> subprocess.CompletedProcess:
        proc = run_kiln(*args, artifacts=tiny_run["artifacts"], env={"MLFLOW_TRACKING_URI": team_store})
        assert proc.returncode == 0, f"kiln {' '.join(args)}\n{proc.stdout}\n{proc.stderr}"
        return proc

    kiln("run", str(TINY_RECIPE), "--set", "quantize.method=none")
    kiln("run", str(TINY_RECIPE))
    keys = bucket_keys(s3_endpoint)
    assert any("/models/m-" in k and k.endswith("/artifacts/artifacts/engine/engine.onnx") for k in keys), keys[:20]  # the LoggedModel's
    assert any(k.endswith("/artifacts/validation/report.html") for k in keys)

    for version, alias in (("1", "staging"), ("1", "production"), ("2", "staging")):
        kiln("promote", MODEL, version, "--to", alias)
    kiln("promote", MODEL, "2", "--to", "production", "--force")  # v2 agrees with the source less: forced
    back = kiln("rollback", MODEL)
    assert "version 1 (rolled back from version 2)" in back.stdout
    assert any("/artifacts/audit/" in k and k.endswith("-promote-production-v2.json") for k in bucket_keys(s3_endpoint))

    pulled = kiln("models", "pull", f"models:/{MODEL}@production", "--dest", str(tmp_path / "prod"))
    paths = json.loads(pulled.stdout)
    assert paths["version"] == "1" and "sha256 verified" in pulled.stderr
    assert (Path(paths["triton_repository"]) / MODEL / "1" / "engine" / "engine.onnx").is_file()
    diff = kiln("models", "diff", f"{MODEL}@production", f"{MODEL}@staging")
    assert "quantize.method" in diff.stdout

    import mlflow.pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_store)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@production")  # the MLflow model, out of S3
    assert model.predict({"prompt": ["Hello"]}, params={"max_tokens": 3})["completion_tokens"][0] <= 3


def test_kiln_serve_a_version_from_the_team_store(team_store, tiny_run):
    """`kiln serve models:/NAME@production` with the package downloaded out of S3 through the server."""
    from tests.integration.test_triton import kiln_serve_generate, serving_environment

    serving_environment()
    if run_kiln("models", "show", f"{MODEL}@production", artifacts=tiny_run["artifacts"],
                env={"MLFLOW_TRACKING_URI": team_store}).returncode != 0:
        pytest.skip("runs after the registration test above, which promotes a version")
    text, printed = kiln_serve_generate(f"models:/{MODEL}@production", MODEL, tiny_run["artifacts"], "hello", 4, store=team_store)
    assert "Triton package sha256 verified" in printed and text
