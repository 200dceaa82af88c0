"""The tiny recipe's Triton package served by the real Triton server (from nvidia-pytriton, in the
serving environment), spoken to only through tritonclient and HTTP."""

import contextlib
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


def serving_environment():
    """The serving environment, or the test skipped saying why it could not be created."""
    try:
        return ensure_environment()
    except Exception as e:  # no package registry: say so instead of failing every test below
        pytest.skip(f"the Triton serving environment could not be created here: {e}")


@pytest.fixture(scope="module")
def env():
    return serving_environment()


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
    return post(f"{addresses.http}/v2/models/{MODEL}/generate", json.dumps(body).encode())


def post(url: str, body: bytes, content_type: str | None = None) -> tuple[int, dict]:
    """POST as urllib does by default: without a content type it sends application/x-www-form-urlencoded,
    as `curl -d` does."""
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type} if content_type else {})
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
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
    ({"text_input": "x" * 100_000, "max_tokens": 4}, "characters cannot fit the context limit of 256 tokens"),  # never tokenized
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


@pytest.fixture(scope="module")
def long_package(tmp_path_factory) -> Path:
    """The tiny recipe's package with room for 4000-token generations: a cancelled one would still
    be decoding long after its cancellation is seen."""
    from tests.conftest import TINY_RECIPE, run_kiln

    artifacts = tmp_path_factory.mktemp("long")
    run_kiln("run", str(TINY_RECIPE), "--set", "build.max_sequence_length=4200", "--set", "package.max_tokens_cap=4096",
             artifacts=artifacts, check=True)
    summary = json.loads((artifacts / "last_run.json").read_text())
    return Path(next(s["path"] for s in summary["stages"] if s["stage"] == "package"))


def test_a_cancelled_stream_frees_its_row_within_a_step(env, tmp_path, long_package):
    """A long generation (4000 tokens) whose gRPC stream the client cancels after the first piece
    stops at once: the active-rows gauge falls to 0, the cancelled counter counts it, and the next
    request is answered while the cancelled one would still be decoding."""
    import tritonclient.grpc as grpcclient

    with triton_server(long_package / "model_repository", env, tmp_path / "server.log") as (_proc, addresses):
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


def start_kiln_serve(target: str, artifacts, store: str | None = None, *options: str):
    """`kiln serve TARGET [OPTIONS]` as a user runs it, on free ports, until its address line; returns
    (process, address record, lines printed so far)."""
    import os
    import subprocess
    import sys

    from pipeline.serving.server import free_ports
    from tests.conftest import ROOT

    ports = [str(port) for port in free_ports(4)]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {"KILN_ARTIFACTS": str(artifacts), **({"MLFLOW_TRACKING_URI": store} if store else {})}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", target, "--http-port", ports[0], "--grpc-port", ports[1],
                             "--metrics-port", ports[2], "--openai-port", ports[3], *options], cwd=ROOT, text=True, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("{"):
            return proc, json.loads(line), lines
    proc.wait()
    raise AssertionError(f"kiln serve exited {proc.returncode} before serving:\n{''.join(lines)}")


@contextlib.contextmanager
def kiln_serving(target: str, artifacts, store: str | None = None, *options: str):
    """`kiln serve TARGET [OPTIONS]` for the block (its address record and printed lines), then
    SIGTERM: it must exit 0, its output joins the lines, and the guard must have closed its
    keep-alive connections before tritonserver stopped (else tritonserver counts them down for its
    30 s exit timeout: "Timeout 30: Found 1 HTTP service connections")."""
    import signal

    proc, info, lines = start_kiln_serve(target, artifacts, store, *options)
    try:
        yield info, lines
    finally:
        proc.send_signal(signal.SIGTERM)
        lines.append(proc.communicate(timeout=60)[0])
    assert proc.returncode == 0, "".join(lines)
    for log in Path(artifacts).glob("logs/tritonserver-*.log"):
        assert "HTTP service connections" not in log.read_text(errors="replace"), log


def kiln_serve_generate(target: str, model: str, artifacts, prompt: str, max_tokens: int,
                        store: str | None = None, inspect=None) -> tuple[str, str]:
    """Generate once over HTTP from `kiln serve TARGET`, then stop it. Returns the generated text
    and everything `kiln serve` printed."""
    with kiln_serving(target, artifacts, store) as (info, lines):
        assert info["models"] == [model], lines
        status, answer = post(f"{info['http']}/v2/models/{model}/generate",
                              json.dumps({"text_input": prompt, "max_tokens": max_tokens}).encode())
        assert status == 200, answer
        if inspect is not None:
            inspect(info)
    return answer["text_output"], "".join(lines)


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


def test_no_request_on_kiln_serves_http_port_crashes_the_server(tmp_path, env, package, reference):
    """Measured: a form-encoded body over ~4 MiB kills tritonserver 2.51 (libevhtp parses it as a
    query string onto its stack), and tritonserver answers malformed JSON with 500. On the HTTP port
    `kiln serve` publishes: 5 MB is a 400 (cap), a form-encoded 5 MB body under a raised cap reaches
    the model as JSON (its 400), malformed or ill-typed JSON is a 400 naming the field, and after
    all of it the server is ready and answers, whole and streamed, exactly as before."""
    five_mb = json.dumps({"text_input": "a " * (5 << 19), "max_tokens": 4}).encode()
    with kiln_serving(str(package.parent), tmp_path, None, "--max-body-bytes", str(8 << 20)) as (info, _):
        url = f"{info['http']}/v2/models/{MODEL}/generate"
        status, answer = post(url, five_mb)  # form-encoded, yet it reaches the model (as JSON), which refuses it
        assert status == 400 and "characters cannot fit the context limit" in answer["error"], answer
        for body, message in [(b"x" * (9 << 20), "over this server's limit of 8388608 bytes"),
                              (b'{"text_input": "hi", "max_tokens": ', "the request body is not JSON"),
                              (b"\x00\xff garbage", "the request body is not JSON"),
                              (b"[1, 2]", "must be a JSON object"),
                              (b'{"text_input": 5}', "text_input must be a string (BYTES), got 5"),
                              (b'{"text_input": "hi", "max_tokens": 3000000000}', "max_tokens must be an integer from -2147483648 to 2147483647"),
                              (b'{"text_input": "hi", "seed": -1}', "seed must be an integer from 0 to"),
                              (b'{"text_input": "hi", "stream": 1}', "stream must be true or false")]:
            status, answer = post(url, body)
            assert status == 400 and message in answer["error"], (body[:60], status, answer)
        assert http_status(f"{info['http']}/v2/health/ready") == 200
        status, answer = post(url, json.dumps({"text_input": "ok", "max_tokens": 3}).encode(), "application/json")
        assert status == 200 and answer["text_output"] == reference("ok", 3) and answer["model_version"] == "1"
        req = urllib.request.Request(f"{info['http']}/v2/models/{MODEL}/generate_stream", method="POST",
                                     data=json.dumps({"text_input": "ok", "max_tokens": 3, "stream": True}).encode())
        with urllib.request.urlopen(req, timeout=60) as response:
            events = [json.loads(line[6:]) for line in response.read().decode().splitlines() if line.startswith("data: ")]
        assert "".join(e["text_output"] for e in events) == reference("ok", 3) and events[-1]["finish_reason"] in ("eos", "length")


def test_an_http_stream_whose_client_disconnects_stops_its_row(env, tmp_path, long_package):
    """`/generate_stream` through kiln serve's HTTP port: the client reads one event and closes
    its connection; the guard closes its own to tritonserver, which cancels the request: the
    cancelled counter counts it and the active-rows gauge falls to 0."""
    import http.client
    import types

    with kiln_serving(str(long_package), tmp_path) as (info, _):
        host, port = info["http"].removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        connection.request("POST", f"/v2/models/{MODEL}/generate_stream", json.dumps({"text_input": "a", "max_tokens": 4000, "stream": True}))
        response = connection.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
        connection.sock.close()
        connection.close()
        server = types.SimpleNamespace(metrics=info["metrics"])  # what metric_value reads
        deadline = time.monotonic() + 10
        while metric_value(server, "kiln_cancelled_requests_total") < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert metric_value(server, "kiln_cancelled_requests_total") == 1
        assert metric_value(server, "kiln_active_rows") == 0


def test_sigterm_under_load_ends_every_stream_and_leaves_no_process(env, tmp_path, long_package):
    """12 OpenAI-API clients stream 4000-token completions through kiln serve's gateway (8 rows
    decode, 4 wait for a row) and kiln serve gets SIGTERM mid-stream. It exits 0 within 10 s, every
    stream, running or waiting, ends with a finish reason and [DONE], tritonserver unloads the model
    gracefully (no exit timeout in its log) and its process is gone."""
    import asyncio
    import os
    import signal

    import httpx

    proc, info, lines = start_kiln_serve(str(long_package), tmp_path)
    model = httpx.get(f"{info['openai']}/models").json()["data"][0]["id"]
    streaming = asyncio.Event()

    async def one(client):
        body = {"model": model, "prompt": "a", "max_tokens": 4000, "temperature": 0, "stream": True}
        finish, done = None, False
        async with client.stream("POST", f"{info['openai']}/completions", json=body, timeout=60) as response:
            if response.status_code != 200:
                return response.status_code
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    streaming.set()
                    finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
        return finish, done

    async def load():
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=20)) as client:
            tasks = [asyncio.create_task(one(client)) for _ in range(12)]
            await asyncio.wait_for(streaming.wait(), 60)
            await asyncio.sleep(0.5)
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks), started

    ended, started = asyncio.run(load())
    lines.append(proc.communicate(timeout=60)[0])
    took = time.monotonic() - started
    assert proc.returncode == 0 and took < 10, (took, "".join(lines))
    assert ended == [("stop", True)] * 12, ended  # the model's "cancelled", as OpenAI's finish_reason
    log = next(Path(tmp_path).glob("logs/tritonserver-*.log")).read_text(errors="replace")
    assert "Exit timeout expired" not in log and "Non-graceful termination" not in log, log[-2000:]
    with pytest.raises(ProcessLookupError):
        os.kill(info["pid"], 0)


def test_the_container_entrypoint_puts_the_guard_in_front_and_ends_with_either_process(tmp_path, env, package, reference):
    """deploy/entrypoint.sh (the image's entry point; the image itself is not built here) with this
    machine's tritonserver: the published HTTP port is the guard (a 5 MB form-encoded body is a
    400, generation works), and tritonserver dying ends the entry point with a failure status."""
    import os
    import signal
    import subprocess
    import sys

    from pipeline.serving.server import free_ports
    from tests.conftest import ROOT

    repository = tmp_path / "models"
    shutil.copytree(package, repository)  # the Python backend writes __pycache__ into it
    python = tmp_path / "python"  # the guard runs on Kiln's interpreter, without the serving PYTHONPATH
    python.write_text(f"#!/bin/sh\nunset PYTHONPATH\nexec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    http, grpc, metrics, triton_http = free_ports(4)
    proc = subprocess.Popen(
        [str(ROOT / "deploy" / "entrypoint.sh"), f"--backend-directory={env.backends}", f"--grpc-port={grpc}",
         f"--metrics-port={metrics}", "--http-thread-count=2"],
        env={**env.process_env(), "MODEL_REPOSITORY": str(repository), "HTTP_PORT": str(http), "TRITON_HTTP_PORT": str(triton_http),
             "TRITONSERVER": str(env.tritonserver), "PYTHON": str(python), "HTTP_GUARD": str(ROOT / "pipeline/serving/http_guard.py")},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{http}"
        deadline = time.monotonic() + 120
        while http_status(f"{url}/v2/health/ready") != 200:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.3)
        status, answer = post(f"{url}/v2/models/{MODEL}/generate", json.dumps({"text_input": "a " * (5 << 19)}).encode())
        assert status == 400 and "over this server's limit of 1048576 bytes" in answer["error"], answer
        status, answer = post(f"{url}/v2/models/{MODEL}/generate", json.dumps({"text_input": "ok", "max_tokens": 3}).encode())
        assert status == 200 and answer["text_output"] == reference("ok", 3)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        triton = next(int(pid) for pid in children if Path(f"/proc/{pid}/comm").read_text().strip() == "tritonserver")
        os.kill(triton, signal.SIGKILL)
        proc.wait(60)
        assert proc.returncode != 0
        assert http_status(f"{url}/v2/health/live") is None  # the guard went with it
    finally:  # the whole group: also a Python-backend stub its killed server left behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def package_as(tiny_run, tmp_path, target: str = "onnxruntime-cpu", package: dict | None = None, **meta) -> Path:
    """The package stage on the tiny engine recorded as a `target` engine (its files stay the CPU
    build's: what this checks is the packaging and the refusals, not a GPU run), with the package
    manifest the runner writes."""
    from rich.console import Console

    from pipeline.artifacts import Engine, write_manifest
    from pipeline.recipe import PackageConfig
    from pipeline.runner import RunContext, StageContext
    from pipeline.settings import Settings
    from pipeline.stages import package as package_stage

    build = tiny_run["paths"]["build"]
    out = tmp_path / f"package-{target}"
    out.mkdir()
    ctx = StageContext(RunContext(Settings.from_env(tmp_path / "artifacts"), Console(quiet=True), "test"), "package", out)
    engine = Engine(build, meta={**read_manifest(build)["meta"], "target": target, **meta})
    cfg = PackageConfig(model_name=MODEL, **(package or {"instances": 2}))
    write_manifest(out, dict(package_stage.run(cfg, engine, ctx=ctx).meta))
    return out


@pytest.mark.parametrize("max_queue", [1, 0])
def test_a_full_queue_refuses_at_once_with_server_busy_and_serves_the_rest(tiny_run, env, tmp_path, reference, max_queue):
    """One row (max_batch 1) and `max_queue` waiting places: while a long request decodes, of ten
    more sent at once `max_queue` wait and the others are refused at once with "server busy"; the
    long one (which found its row free, also with no waiting places) and those that waited are
    answered in full."""
    import tritonclient.grpc as grpcclient

    package = package_as(tiny_run, tmp_path, package={"max_batch": 1, "max_queue": max_queue})
    with triton_server(package / "model_repository", env, tmp_path / "server.log") as (_proc, addresses):
        results: dict[str, list] = {}
        errors: list[str] = []  # a stream's error carries no request id
        done = threading.Event()

        def callback(result, error):
            if error is not None:
                errors.append(str(error))
            else:
                response = result.get_response()
                final = response.parameters.get("triton_final_response")
                results.setdefault(response.id, []).append(("final" if final and final.bool_param else "piece",
                                                            result.as_numpy("text_output")))
            if len(errors) + sum(any(kind == "final" for kind, _ in r) for r in results.values()) == 11:
                done.set()

        client = grpcclient.InferenceServerClient(addresses.grpc)
        client.start_stream(callback=callback)
        # all on one stream, in order, at once: the long one takes the free row (or the waiting room's
        # one place) first. Waiting for its first piece before sending the others let it finish before
        # the last of them arrived in a fresh-clone run (the tiny engine decodes 230 tokens fast)
        client.async_stream_infer(MODEL, streaming_request("a", 230), request_id="long", enable_empty_final_response=True)
        for i in range(10):
            client.async_stream_infer(MODEL, streaming_request("ok", 3), request_id=f"short-{i}", enable_empty_final_response=True)
        assert done.wait(120), (results, errors)
        client.stop_stream()
    answered = [rid for rid, r in results.items() if any(kind == "final" for kind, _ in r)]
    assert errors and all(f"server busy: 1 requests running and {max_queue} waiting; retry later" in e for e in errors), errors
    assert "long" in answered and len(answered) + len(errors) == 11, (answered, errors)
    assert len(answered) >= 1 + max_queue if max_queue else answered == ["long"], answered
    for rid in answered:
        text = "".join(piece[0].decode() for kind, piece in results[rid] if kind == "piece" and piece is not None)
        assert text == (reference("a", 230) if rid == "long" else reference("ok", 3)), rid


@pytest.mark.parametrize("target, meta, missing", [
    ("onnxruntime-cuda", {}, "this engine runs on ONNX Runtime's CUDAExecutionProvider; onnxruntime"),
    ("tensorrt", {"model_file": "engine.plan", "build_settings": {"max_sequence_length": 256, "new_tokens": {"max": 64}}},
     "this engine is a TensorRT plan: it needs the tensorrt package and torch with CUDA"),
])
def test_gpu_engines_are_packaged_for_gpu_instances_and_refused_clearly_where_they_cannot_run(tiny_run, env, tmp_path,
                                                                                                target, meta, missing):
    """A GPU engine's package: KIND_GPU instances, the target and its limits in serving.json. Here
    (no GPU, CPU onnxruntime, no tensorrt) `kiln serve` refuses it before starting anything, and
    tritonserver given the same model on an instance it can create (KIND_CPU) logs the model's own
    refusal and never reports it ready."""
    package = package_as(tiny_run, tmp_path, target, **meta)
    model_dir = package / "model_repository" / MODEL
    assert "instance_group [ { kind: KIND_GPU count: 2 } ]" in (model_dir / "config.pbtxt").read_text()
    serving = json.loads((model_dir / "1" / "serving.json").read_text())
    assert serving["session_options"]["target"] == target
    if target == "tensorrt":
        assert serving["limits"]["context_limit"] == 256 and serving["limits"]["max_prompt_tokens"] == 64

    from tests.conftest import run_kiln

    out = run_kiln("serve", str(package), artifacts=tmp_path)
    assert out.returncode == 5 and f"runs a {target} engine on KIND_GPU instances" in out.stdout, out.stdout
    assert "deploy/Dockerfile" in out.stdout and "Traceback" not in out.stdout

    repository = tmp_path / "as-cpu"
    shutil.copytree(package / "model_repository", repository)
    config = repository / MODEL / "config.pbtxt"
    config.write_text(config.read_text().replace("KIND_GPU", "KIND_CPU"))
    log = tmp_path / "server.log"
    with triton_server(repository, env, log, wait_ready=False) as (_proc, addresses):
        deadline = time.monotonic() + 60
        while "cannot run this engine here" not in log.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert http_status(f"{addresses.http}/v2/models/{MODEL}/ready") != 200
    text = " ".join(log.read_text(errors="replace").split())
    assert "kiln: cannot run this engine here: " + missing in text, text[-2000:]


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


def test_an_engine_with_prompts_on_openvino_serves_its_own_greedy_output(env, tmp_path_factory):
    """`build.prefill_runtime: openvino`: the Triton model (serving environment) runs a long prompt
    on OpenVINO and decodes on ONNX Runtime, giving what the same engine gives outside Triton."""
    from tests.conftest import TINY_RECIPE, run_kiln

    artifacts = tmp_path_factory.mktemp("openvino")
    run_kiln("run", str(TINY_RECIPE), "--set", "build.prefill_runtime=openvino", artifacts=artifacts, check=True)
    paths = {s["stage"]: Path(s["path"]) for s in json.loads((artifacts / "last_run.json").read_text())["stages"]}
    assert read_manifest(paths["build"])["meta"]["session_options"]["prefill_runtime"] == "openvino"
    reference = engine_greedy_text(paths["build"], paths["package"], MODEL)
    long_prompt = "Compilers turn recipes into engines, and engines into tokens: " * 2  # 126 byte-level tokens
    with triton_server(paths["package"] / "model_repository", env, artifacts / "server.log") as (_, addresses):
        for prompt in (long_prompt, "def main():"):
            status, body = generate(addresses, {"text_input": prompt, "max_tokens": 12})
            assert status == 200, body
            assert body["text_output"] == reference(prompt, 12)


def test_an_engine_with_a_batch_graph_serves_single_and_concurrent_requests(env, tmp_path_factory):
    """`build.batch_kernel: int8_gemm`: the package carries the batch graph under its manifest, the
    Triton model (serving environment) loads it, a lone request decodes on the engine's own kernel
    (the engine's greedy output outside Triton), and concurrent requests, whose steps of 2+ rows
    run on the batch graph, each get a complete answer."""
    from tests.conftest import TINY_RECIPE, run_kiln

    artifacts = tmp_path_factory.mktemp("batch-kernel")
    run_kiln("run", str(TINY_RECIPE), "--set", "build.int4_compute=int8", "--set", "build.batch_kernel=int8_gemm",
             "--set", "build.batch_kernel_min_rows=2", artifacts=artifacts, check=True)
    paths = {s["stage"]: Path(s["path"]) for s in json.loads((artifacts / "last_run.json").read_text())["stages"]}
    version_dir = paths["package"] / "model_repository" / MODEL / "1"
    assert "engine/batch.onnx" in read_manifest(version_dir)["files"]
    reference = engine_greedy_text(paths["build"], paths["package"], MODEL)
    prompts = [f"request {i}: " + "ab" * i for i in range(4)]
    with triton_server(paths["package"] / "model_repository", env, artifacts / "server.log") as (_, addresses):
        status, body = generate(addresses, {"text_input": prompts[0], "max_tokens": 12})
        assert status == 200 and body["text_output"] == reference(prompts[0], 12), body
        answers: dict[int, tuple[int, dict]] = {}
        threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, generate(addresses, {"text_input": prompts[i], "max_tokens": 24})))
                   for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for i in range(len(prompts)):
            status, body = answers[i]
            assert status == 200 and body["text_output"], (i, body)
