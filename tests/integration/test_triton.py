"""The tiny recipe's Triton package served by the real Triton server (from nvidia-pytriton, in the
serving environment), spoken to only through tritonclient and HTTP."""

import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pipeline.artifacts import read_manifest
from pipeline.modeling.runtime import greedy_decode
from pipeline.serving.environment import ensure_environment
from pipeline.serving.grpc_inputs import streaming_request
from pipeline.serving.server import http_status, stop, triton_server
from pipeline.targets import get_target

pytestmark = pytest.mark.integration
MODEL = "tiny-llama-int4"


@pytest.fixture(scope="module")
def package(tiny_run):
    return tiny_run["paths"]["package"] / "model_repository"


@pytest.fixture(scope="module")
def env():
    try:
        return ensure_environment()
    except Exception as e:  # no package registry: say so instead of failing every test below
        pytest.skip(f"the Triton serving environment could not be created here: {e}")


@pytest.fixture(scope="module")
def server(package, env, tmp_path_factory):
    log = tmp_path_factory.mktemp("triton") / "server.log"
    with triton_server(package, env, log) as (proc, addresses):
        yield proc, addresses, log


def engine_greedy_text(engine_dir, package_dir, model: str):
    """The engine's own greedy continuation, outside Triton: token ids up to EOS, decoded."""
    from tokenizers import Tokenizer

    engine_dir = Path(engine_dir)
    meta = read_manifest(engine_dir)["meta"]
    lm = get_target(meta["target"]).load(engine_dir, meta)
    tokenizer = Tokenizer.from_file(str(engine_dir / "tokenizer.json"))
    eos = json.loads((Path(package_dir) / "model_repository" / model / "1" / "serving.json").read_text())["eos_token_ids"]

    def complete(prompt: str, max_tokens: int) -> str:
        ids, _, _ = greedy_decode(lm, np.asarray(tokenizer.encode(prompt).ids, dtype=np.int64), max_tokens, lambda: 0.0)
        if any(t in eos for t in ids):
            ids = ids[: next(i for i, t in enumerate(ids) if t in eos)]
        return tokenizer.decode(ids, skip_special_tokens=True)

    return complete


@pytest.fixture(scope="module")
def reference(tiny_run):
    return engine_greedy_text(tiny_run["paths"]["build"], tiny_run["paths"]["package"], MODEL)


def generate(addresses, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"{addresses.http}/v2/models/{MODEL}/generate", data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def stream_grpc(addresses, prompt: str, max_tokens: int) -> list[str]:
    import tritonclient.grpc as grpcclient

    pieces, done, errors, finals = [], threading.Event(), [], []

    def callback(result, error):
        if error is not None:
            errors.append(error)
            done.set()
            return
        response = result.get_response()
        if response.outputs and result.as_numpy("finish_reason") is None:  # the final response sums up, below
            pieces.append(result.as_numpy("text_output")[0].decode())
        elif response.outputs:
            finals.append((result.as_numpy("finish_reason")[0].decode(), int(result.as_numpy("completion_tokens")[0])))
        if response.parameters.get("triton_final_response") and response.parameters["triton_final_response"].bool_param:
            done.set()

    client = grpcclient.InferenceServerClient(addresses.grpc)
    inputs = streaming_request(prompt, max_tokens)
    client.start_stream(callback=callback)
    client.async_stream_infer(MODEL, inputs, enable_empty_final_response=True)
    assert done.wait(60), "no final response"
    client.stop_stream()
    assert not errors, errors
    assert len(finals) == 1 and finals[0][0] in ("eos", "length") and 1 <= finals[0][1] <= max_tokens, finals
    return pieces


def test_health_metrics_and_model_metadata(server):
    import tritonclient.http as httpclient

    _, addresses, _ = server
    client = httpclient.InferenceServerClient(f"{addresses.host}:{addresses.http_port}")
    assert client.is_server_ready() and client.is_model_ready(MODEL)
    inputs = {i["name"] for i in client.get_model_metadata(MODEL)["inputs"]}
    assert {"text_input", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stream"} <= inputs
    with urllib.request.urlopen(addresses.metrics, timeout=10) as response:
        assert b"nv_inference_request_success" in response.read()


def test_generation_equals_the_engines_greedy_output(server, reference):
    _, addresses, _ = server
    status, body = generate(addresses, {"text_input": "def main():", "max_tokens": 12})
    assert status == 200, body
    assert body["text_output"] == reference("def main():", 12)
    assert body["finish_reason"] in ("eos", "length") and body["prompt_tokens"] > 0
    assert body["completion_tokens"] == 12 or body["finish_reason"] == "eos"


def test_streaming_yields_the_same_text_token_by_token(server, reference):
    _, addresses, _ = server
    pieces = stream_grpc(addresses, "The quick brown fox", 10)
    assert "".join(pieces) == reference("The quick brown fox", 10)
    assert len(pieces) >= 1


@pytest.mark.parametrize("body,message", [
    ({"text_input": "", "max_tokens": 4}, "text_input is empty"),
    ({"text_input": "hi", "max_tokens": 65}, "max_tokens must be between 1 and 64"),
    ({"text_input": "hi", "temperature": -1.0}, "temperature must be >= 0"),
    ({"text_input": "hi", "top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"text_input": "x" * 250, "max_tokens": 16}, "exceeds the context limit of 256 tokens"),
])
def test_bad_requests_are_rejected_and_the_server_keeps_serving(server, reference, body, message):
    _, addresses, _ = server
    status, answer = generate(addresses, body)
    assert status == 400 and message in answer["error"], answer
    status, answer = generate(addresses, {"text_input": "ok", "max_tokens": 3})
    assert status == 200 and answer["text_output"] == reference("ok", 3)


def test_sampling_is_seeded(server):
    _, addresses, _ = server
    body = {"text_input": "Once", "max_tokens": 8, "temperature": 1.0, "top_k": 20, "top_p": 0.9, "seed": 7}
    first, second = generate(addresses, body), generate(addresses, body)
    assert first[0] == second[0] == 200 and first[1]["text_output"] == second[1]["text_output"]


def test_sixteen_concurrent_clients_each_get_their_own_complete_answer(server, reference):
    _, addresses, _ = server
    prompts = [(f"request {i}: " + "ab" * (i % 5), 4 + i % 7) for i in range(16)]
    answers: dict[int, tuple[int, dict]] = {}

    def ask(i):
        answers[i] = generate(addresses, {"text_input": prompts[i][0], "max_tokens": prompts[i][1]})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, (prompt, max_tokens) in enumerate(prompts):
        status, body = answers[i]
        assert status == 200 and body["text_output"] == reference(prompt, max_tokens), (i, body)


def metric_lines(addresses, name: str) -> list[str]:
    with urllib.request.urlopen(addresses.metrics, timeout=10) as response:
        return [line for line in response.read().decode().splitlines() if line.startswith(name)]


def metric_value(addresses, name: str) -> float:
    lines = metric_lines(addresses, name + "{")
    assert lines, f"no {name} on the metrics port"
    return float(lines[0].rsplit(" ", 1)[1])


def test_per_request_metrics_carry_model_and_version(server):
    _, addresses, _ = server
    before = metric_value(addresses, "kiln_time_to_first_token_seconds_count")
    assert generate(addresses, {"text_input": "metrics", "max_tokens": 5})[0] == 200
    labels = f'model="{MODEL}",version="1"'
    for name in ("kiln_time_to_first_token_seconds_count", "kiln_time_per_output_token_seconds_count", "kiln_queue_wait_seconds_count",
                 "kiln_generated_tokens_bucket", "kiln_active_rows", "kiln_cancelled_requests_total"):
        assert any(labels in line for line in metric_lines(addresses, name)), name
    assert metric_value(addresses, "kiln_time_to_first_token_seconds_count") == before + 1
    assert metric_value(addresses, "kiln_active_rows") == 0


def test_a_cancelled_stream_frees_its_row_within_a_step(env, tmp_path):
    """A long generation (4000 tokens) whose gRPC stream the client cancels after the first piece
    stops at once: the active-rows gauge falls to 0, the cancelled counter counts it, and the next
    request is answered while the cancelled one would still be decoding."""
    import tritonclient.grpc as grpcclient

    from tests.conftest import TINY_RECIPE, run_kiln

    run_kiln("run", str(TINY_RECIPE), "--set", "build.max_sequence_length=4200", "--set", "package.max_tokens_cap=4096",
             artifacts=tmp_path, check=True)
    summary = json.loads((tmp_path / "last_run.json").read_text())
    repository = Path(next(s["path"] for s in summary["stages"] if s["stage"] == "package")) / "model_repository"
    with triton_server(repository, env, tmp_path / "server.log") as (_proc, addresses):
        first = threading.Event()
        client = grpcclient.InferenceServerClient(addresses.grpc)
        client.start_stream(callback=lambda result, error: first.set())
        client.async_stream_infer(MODEL, streaming_request("a", 4000))
        assert first.wait(30)
        client.stop_stream(cancel_requests=True)
        deadline = time.monotonic() + 5
        while metric_value(addresses, "kiln_cancelled_requests_total") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric_value(addresses, "kiln_cancelled_requests_total") == 1
        assert metric_value(addresses, "kiln_active_rows") == 0
        assert generate(addresses, {"text_input": "after", "max_tokens": 4})[0] == 200
        assert metric_value(addresses, "kiln_generated_tokens_count") == 1  # only "after" ran to its end


def test_a_tampered_repository_is_refused_and_never_ready(package, env, tmp_path):
    copy = tmp_path / "model_repository"
    shutil.copytree(package, copy)
    tokenizer = copy / MODEL / "1" / "engine" / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes() + b" ")
    log = tmp_path / "server.log"
    with triton_server(copy, env, log, wait_ready=False) as (_proc, addresses):
        for _ in range(200):
            if "refusing to load" in log.read_text(errors="replace"):
                break
            threading.Event().wait(0.1)
        assert http_status(f"{addresses.http}/v2/models/{MODEL}/ready") != 200
        assert http_status(f"{addresses.http}/v2/health/ready") != 200
    text = log.read_text(errors="replace")
    assert "refusing to load" in text and "sha256 mismatch: engine/tokenizer.json" in text


def test_server_shuts_down_cleanly_on_sigterm(package, env, tmp_path):
    with triton_server(package, env, tmp_path / "server.log") as (proc, _):
        pass
    assert proc.returncode == 0
    assert stop(proc) == 0


def start_kiln_serve(target: str, artifacts, store: str | None = None):
    """`kiln serve TARGET` as a user runs it, on free ports, until its address line; returns
    (process, address record, lines printed so far)."""
    import os
    import subprocess
    import sys

    from pipeline.serving.server import free_port
    from tests.conftest import ROOT

    ports = [str(free_port()) for _ in range(4)]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {"KILN_ARTIFACTS": str(artifacts), **({"MLFLOW_TRACKING_URI": store} if store else {})}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", target, "--http-port", ports[0], "--grpc-port", ports[1],
                             "--metrics-port", ports[2], "--openai-port", ports[3]], cwd=ROOT, text=True, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("{"):
            return proc, json.loads(line), lines
    proc.wait()
    raise AssertionError(f"kiln serve exited {proc.returncode} before serving:\n{''.join(lines)}")


def kiln_serve_generate(target: str, model: str, artifacts, prompt: str, max_tokens: int,
                        store: str | None = None, inspect=None) -> tuple[str, str]:
    """Generate once over HTTP from `kiln serve TARGET`, then stop it with SIGTERM (exit 0).
    Returns the generated text and everything `kiln serve` printed."""
    import signal

    proc, info, lines = start_kiln_serve(target, artifacts, store)
    try:
        assert info["models"] == [model], lines
        req = urllib.request.Request(f"{info['http']}/v2/models/{model}/generate",
                                     data=json.dumps({"text_input": prompt, "max_tokens": max_tokens}).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=60) as response:
            text = json.loads(response.read())["text_output"]
        if inspect is not None:
            inspect(info)
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, rest
    return text, "".join(lines) + rest


def test_kiln_serve_a_registered_version_by_alias(tmp_path, env, reference):
    """The user's path: run, promote to staging, `kiln serve models:/NAME@staging`, generate, stop.
    Triton serves it as the registry's version (2 here), in its metadata and its metrics' labels."""
    from tests.conftest import TINY_RECIPE, run_kiln

    run_kiln("run", str(TINY_RECIPE), "--set", "quantize.method=none", artifacts=tmp_path, check=True)
    run_kiln("run", str(TINY_RECIPE), artifacts=tmp_path, check=True)
    run_kiln("promote", MODEL, "2", "--to", "staging", artifacts=tmp_path, check=True)
    seen = {}

    def inspect(info):
        with urllib.request.urlopen(f"{info['http']}/v2/models/{MODEL}", timeout=10) as r:
            seen["versions"] = json.loads(r.read())["versions"]
        with urllib.request.urlopen(info["metrics"], timeout=10) as r:
            seen["metrics"] = r.read().decode()

    text, printed = kiln_serve_generate(f"models:/{MODEL}@staging", MODEL, tmp_path, "hello", 6, inspect=inspect)
    assert "Triton package sha256 verified" in printed and '"version": "2"' in printed
    assert text == reference("hello", 6)
    assert seen["versions"] == ["2"] and f'kiln_active_rows{{model="{MODEL}",version="2"}}' in seen["metrics"]


def test_kiln_serve_exits_non_zero_when_the_server_dies(tmp_path, env, package):
    """tritonserver killed under `kiln serve`: it says so with the log's last lines and exits 12."""
    import os
    import signal

    proc, info, _ = start_kiln_serve(str(package.parent), tmp_path)
    try:
        os.kill(info["pid"], signal.SIGKILL)
        rest = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 12, rest
    assert "tritonserver stopped serving (killed by SIGKILL)" in " ".join(rest.split()) and "last lines of" in rest


def test_kiln_serve_a_non_llama_family(tmp_path, env):
    """Gemma 2 (post norms, soft-capping, GELU, sliding window) built end to end by `kiln run` and
    served: Triton's answer is the engine's own greedy continuation."""
    from tests.conftest import TINY_RECIPE, run_kiln

    name = "tiny-gemma2-int4"
    run_kiln("run", str(TINY_RECIPE), "--set", "source.random_model.family=gemma2", "--set", f"register.model_name={name}",
             artifacts=tmp_path, check=True)
    summary = json.loads((tmp_path / "last_run.json").read_text())
    paths = {s["stage"]: Path(s["path"]) for s in summary["stages"]}
    assert read_manifest(paths["source"])["meta"]["architecture"] == "Gemma2ForCausalLM"
    text, _ = kiln_serve_generate(str(paths["package"]), name, tmp_path, "def main():", 8)
    assert text == engine_greedy_text(paths["build"], paths["package"], name)("def main():", 8)
