"""Each registered version is a real MLflow model: `mlflow.pyfunc.load_model` and `mlflow models
serve` generate the same text as Kiln's own decode loop, and a tampered engine never loads."""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pandas as pd
import pytest

from pipeline import engine as decode_engine
from pipeline.modeling.runtime import load_ort_engine
from tests.stores import free_port, terminate, wait_until_ok

pytestmark = pytest.mark.integration

PROMPTS = ["The Python language", "def main():\n    ", "Hello"]


def model_uri(tiny_run) -> str:
    reg = tiny_run["registered"]
    return f"models:/{reg['model_name']}/{reg['version']}"


@pytest.fixture()
def store_env(tiny_run, monkeypatch):
    uri = tiny_run["registered"]["tracking_uri"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    return uri


def eos_ids(tiny_run) -> set[int]:
    serving = tiny_run["paths"]["package"] / "model_repository" / tiny_run["registered"]["model_name"] / "1" / "serving.json"
    return set(json.loads(serving.read_text())["eos_token_ids"])


def kiln_greedy(tiny_run, prompts, max_tokens):
    """Each prompt alone through Kiln's engine and generation code, straight from the build entry."""
    from tokenizers import Tokenizer

    engine = tiny_run["paths"]["build"]
    meta = json.loads((engine / "manifest.json").read_text())["meta"]
    lm = load_ort_engine(engine, {**meta["session_options"], "model_file": meta["model_file"]})
    tok = Tokenizer.from_file(str(engine / "tokenizer.json"))
    limits = decode_engine.Limits(context_limit=10_000, max_tokens_cap=10_000, default_max_tokens=max_tokens)
    texts = []
    for p in prompts:
        out = [""]
        req = decode_engine.parse_request(p, {"max_tokens": max_tokens}, tok, limits)
        decode_engine.generate(lm, [req], tok, eos_ids(tiny_run), lambda _i, d, _f, out=out: out.__setitem__(0, out[0] + d))
        texts.append(out[0])
    return texts


def test_pyfunc_load_model_generates_what_kiln_generates(tiny_run, store_env):
    import mlflow.pyfunc

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = mlflow.pyfunc.load_model(model_uri(tiny_run))
    assert not [str(w.message) for w in caught if "predict" in str(w.message)]  # MLflow's type-hint nag: not on every load
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["prompt"]
    assert {p.name for p in model.metadata.get_params_schema().params} >= {"max_tokens", "temperature", "top_p", "seed", "stop"}
    engine_digest = json.loads((tiny_run["paths"]["build"] / "manifest.json").read_text())["digest"]
    assert model.metadata.metadata["kiln.engine_sha256"] == engine_digest  # lineage travels with the model
    out = model.predict(pd.DataFrame({"prompt": PROMPTS}), params={"max_tokens": 6})
    assert list(out.columns) == ["text", "finish_reason", "prompt_tokens", "completion_tokens"]
    finished = set(out["finish_reason"])
    assert finished <= {"eos", "length"} and all(out["completion_tokens"] <= 6)
    assert all(out.loc[out["finish_reason"] == "length", "completion_tokens"] == 6)
    # batched rows in the pyfunc model == each prompt alone through Kiln's own decode loop
    assert list(out["text"]) == kiln_greedy(tiny_run, PROMPTS, 6)
    sampled = [model.predict({"prompt": ["Hello"]}, params={"max_tokens": 6, "temperature": 0.8, "seed": 3})["text"][0]
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # seeded sampling repeats
    with pytest.raises(Exception, match="max_tokens must be between 1 and"):
        model.predict({"prompt": ["Hello"]}, params={"max_tokens": 10**6})


def test_a_tampered_engine_never_loads(tiny_run, store_env, tmp_path):
    import mlflow.artifacts
    import mlflow.pyfunc

    local = Path(mlflow.artifacts.download_artifacts(model_uri(tiny_run), dst_path=str(tmp_path)))
    onnx_file = local / "artifacts" / "engine" / "engine.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-1] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(Exception, match="differs from its manifest: sha256 mismatch: engine.onnx"):
        mlflow.pyfunc.load_model(str(local))


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_mlflow_models_serve_answers(tiny_run, store_env, tmp_path):
    port = free_port()
    bindir = str(Path(sys.executable).parent)  # mlflow starts uvicorn by name
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri(tiny_run), "--env-manager", "local",
                             "--host", "127.0.0.1", "-p", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ok(f"{url}/ping", proc, tmp_path / "serve.log", "mlflow models serve")
        status, body = post(f"{url}/invocations", {"inputs": {"prompt": PROMPTS[:2]}, "params": {"max_tokens": 5}})
        assert status == 200, body
        assert [p["text"] for p in body["predictions"]] == kiln_greedy(tiny_run, PROMPTS[:2], 5)
        status, body = post(f"{url}/invocations", {"inputs": {"prompt": ["Hello"]}, "params": {"max_tokens": 10**6}})
        assert status == 400 and "max_tokens must be between 1 and" in body["message"]
    finally:
        terminate(proc)
        log.close()
