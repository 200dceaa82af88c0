"""`kiln serve --keys FILE --request-log FILE` with a real tritonserver, spoken to with the official
`openai` client: 401 without a valid key, 404 for a model the key may not call (the same answer as
a model that does not exist), 429 with Retry-After over a tenant's requests or tokens per minute
(tokens counted from real usage), a key added or revoked while serving, and a request log whose
chain `kiln audit verify` checks and which names the first edited, removed or reordered record."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import TINY_RECIPE, run_kiln
from tests.integration.test_triton import MODEL, kiln_serving, serving_environment

pytestmark = pytest.mark.integration
openai = pytest.importorskip("openai", reason="the openai client comes with the test extra (pip install -e .[test])")

KEYS = f"""\
tenants:
  acme:
    models: [{MODEL}]
    priority: critical
  lab:
    models: [other-model]
  tight:
    models: [{MODEL}]
    requests_per_minute: 3
  metered:
    models: [{MODEL}]
    tokens_per_minute: 60
  ops:
    models: [{MODEL}]
    priority: critical
  bulk:
    models: [{MODEL}]
    priority: batch
  single:
    models: [{MODEL}]
    max_concurrent: 1
"""
# a package with 2 rows and 4 places to wait, so a dozen requests overload it
# 2 rows, 4 waiting places, and room for answers long enough (1,900 tokens, a few seconds) that a
# row is still busy when a request sent after it arrives (220 tokens, ~0.3 s, was too tight once in
# CI; 900 tokens, ~1 s, once too: the rows ended before all 6 requests of the overload test arrived)
SMALL = ("--set", "package.max_batch=2", "--set", "package.max_queue=4", "--set", "build.max_sequence_length=2048",
         "--set", "source.random_model.max_position_embeddings=2048", "--set", "package.max_tokens_cap=1900")
ROW_TOKENS = 1900
LONG_PROMPT = "The quick brown fox"


def documented_tenants() -> dict:
    """The two-tenant keys file README.md and docs/deploy.md show (the same tenants in both), for
    the model this test serves."""
    import yaml

    from tests.conftest import ROOT

    blocks = []
    for doc in (ROOT / "README.md", ROOT / "docs" / "deploy.md"):
        text = doc.read_text()
        start = text.index("cat > keys.yaml <<'YAML'\n") + len("cat > keys.yaml <<'YAML'\n")
        blocks.append(yaml.safe_load(text[start:text.index("\nYAML\n", start)].replace("smollm2-135m-int4", MODEL))["tenants"])
    assert blocks[0] == blocks[1], blocks
    return blocks[0]


def add_key(keys, tenant: str, artifacts) -> tuple[str, str]:
    proc = run_kiln("keys", "add", str(keys), "--tenant", tenant, artifacts=artifacts, check=True)
    key = proc.stdout.strip().splitlines()[-1]
    return key.split("-")[1], key


@pytest.fixture(scope="module")
def guarded(tiny_run, tmp_path_factory):
    serving_environment()
    root = tmp_path_factory.mktemp("access")
    keys, log, store = root / "keys.yaml", root / "requests.jsonl", f"sqlite:///{root / 'mlflow.db'}"
    import yaml

    tenants = {**yaml.safe_load(KEYS)["tenants"], **documented_tenants()}
    keys.write_text(yaml.safe_dump({"tenants": tenants}))
    key = {t: add_key(keys, t, tiny_run["artifacts"]) for t in tenants}
    run_kiln("run", str(TINY_RECIPE), *SMALL, artifacts=tiny_run["artifacts"], env={"MLFLOW_TRACKING_URI": store}, check=True)
    with kiln_serving(f"models:/{MODEL}/1", tiny_run["artifacts"], store, "--keys", str(keys), "--request-log", str(log)) as (info, lines):
        yield {"info": info, "keys": keys, "key": key, "log": log, "lines": lines, "artifacts": tiny_run["artifacts"], "root": root}
    # stopping printed the chain's head, which verifies against the file
    head = "".join(lines).split("head ")[-1].split()[0]
    assert run_kiln("audit", "verify", str(log), "--head", head, artifacts=tiny_run["artifacts"]).returncode == 0


def waiting(guarded) -> float:
    """The model's autoscaling gauge: requests waiting for a batch row."""
    import urllib.request

    text = urllib.request.urlopen(guarded["info"]["metrics"], timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("kiln_requests_waiting{"))


def client(guarded, tenant: str | None = None, key: str | None = None):
    api_key = key or (guarded["key"][tenant][1] if tenant else "sk-not-a-kiln-key")
    return openai.OpenAI(base_url=guarded["info"]["openai"], api_key=api_key, max_retries=0, timeout=60)


def test_no_key_or_a_wrong_key_is_401_and_says_so_at_start(guarded):
    assert "API keys: " in "".join(guarded["lines"]) and "Triton's HTTP and gRPC ports stay on 127.0.0.1" in "".join(guarded["lines"])
    acme_id, acme_key = guarded["key"]["acme"]
    for bad in (None, acme_key[:-2] + "xx", f"kiln-{acme_id}-"):
        with pytest.raises(openai.AuthenticationError) as e:
            client(guarded, key=bad).completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(guarded).models.list()


def test_a_tenant_sees_and_calls_only_its_models(guarded):
    assert [m.id for m in client(guarded, "acme").models.list().data] == [MODEL, f"{MODEL}/1"]
    assert client(guarded, "lab").models.list().data == []
    with pytest.raises(openai.NotFoundError) as e:
        client(guarded, "lab").completions.create(model=MODEL, prompt="hi", max_tokens=2)
    # the same answer as a model that does not exist: nothing about what is served
    with pytest.raises(openai.NotFoundError) as missing:
        client(guarded, "acme").completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert e.value.body["message"] == f"The model `{MODEL}` does not exist or you do not have access to it."
    assert missing.value.body["message"] == "The model `no-such-model` does not exist or you do not have access to it."
    answer = client(guarded, "acme").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert answer.model == f"{MODEL}/1" and answer.usage.completion_tokens >= 1


def test_the_documented_two_tenant_set_up_works_as_written(guarded):
    """README's and docs/deploy.md's keys file: support-bot may call the model; nightly-evals only
    its @staging alias, which this one-version server does not serve (so it sees nothing)."""
    answer = client(guarded, "support-bot").completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert answer.model == f"{MODEL}/1"
    assert client(guarded, "nightly-evals").models.list().data == []
    with pytest.raises(openai.NotFoundError):
        client(guarded, "nightly-evals").completions.create(model=MODEL, prompt="hi", max_tokens=2)


def test_requests_per_minute_hold_in_a_burst_with_retry_after(guarded):
    """6 requests at once from a tenant allowed 3 a minute: exactly 3 are served."""
    import asyncio

    async def burst():
        tight = openai.AsyncOpenAI(base_url=guarded["info"]["openai"], api_key=guarded["key"]["tight"][1], max_retries=0, timeout=60)

        async def one():
            try:
                await tight.completions.create(model=MODEL, prompt="hi", max_tokens=2)
                return 200, None
            except openai.RateLimitError as e:
                return 429, e

        return await asyncio.gather(*(one() for _ in range(6)))

    results = asyncio.run(burst())
    assert sorted(status for status, _ in results) == [200] * 3 + [429] * 3
    refused = next(e for status, e in results if status == 429)
    headers = refused.response.headers
    assert refused.body["code"] == "rate_limit_exceeded" and refused.body["type"] == "requests"
    assert 1 <= int(headers["retry-after"]) <= 20 and headers["x-ratelimit-remaining-requests"] == "0"


def test_tokens_per_minute_are_counted_from_real_usage(guarded):
    metered = client(guarded, "metered")
    used, started = [], time.monotonic()
    with pytest.raises(openai.RateLimitError) as e:
        for _ in range(30):
            used.append(metered.completions.create(model=MODEL, prompt="The tokens of this prompt count too", max_tokens=8,
                                                   temperature=0).usage.total_tokens)
    refill = (time.monotonic() - started) * 60 / 60  # 60 tokens a minute come back while this runs
    # admitted while the tenant's 60 were not used up; the request that used them up was the last
    assert e.value.body["type"] == "tokens" and sum(used) >= 60 and sum(used[:-1]) < 60 + refill, used


def test_the_model_gives_a_waiting_batch_place_to_each_critical_request(guarded):
    """At the model, over one gRPC stream: 6 batch requests fill 2 rows and 4 places; once the
    waiting gauge shows 4, 4 critical requests arrive (microseconds apart, while the rows still run
    for a few seconds, ROW_TOKENS): each pushes out a waiting batch request, and every critical one is served."""
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    from pipeline.serving.grpc_inputs import streaming_request

    def inputs(rank: int, tenant: str) -> list:
        extra = [grpcclient.InferInput("priority", [1], "INT32"), grpcclient.InferInput("tenant", [1], "BYTES")]
        extra[0].set_data_from_numpy(np.array([rank], dtype=np.int32))
        extra[1].set_data_from_numpy(np.array([tenant.encode()], dtype=object))
        return streaming_request(LONG_PROMPT, ROW_TOKENS) + extra

    done: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(guarded["info"]["grpc"])
    client.start_stream(callback=lambda result, error: done.put((result, error)))
    for i in range(6):
        client.async_stream_infer(MODEL, inputs(2, "bulk"), request_id=f"batch-{i}")
    deadline = time.monotonic() + 30
    while waiting(guarded) != 4 and time.monotonic() < deadline:  # 2 rows taken (the model knows it), 4 waiting
        time.sleep(0.005)
    for i in range(4):
        client.async_stream_infer(MODEL, inputs(0, "ops"), request_id=f"critical-{i}")
    served, refused = [], []
    while len(served) + len(refused) < 10:
        result, error = done.get(timeout=120)
        if error is not None:
            refused.append(str(error))
        elif result.as_numpy("finish_reason") is not None:
            served.append(result.get_response().id)
    client.stop_stream()
    client.close()
    assert sorted(served) == ["batch-0", "batch-1"] + [f"critical-{i}" for i in range(4)], (served, refused)
    assert len(refused) == 4 and all("a higher-priority request took its place" in r for r in refused), refused


def test_under_overload_batch_requests_are_refused_first_and_critical_ones_all_served(guarded):
    """2 rows run and 4 wait, all batch class; 4 critical requests arrive and each takes a waiting
    batch request's place (those get 503 "server busy"). Every critical request is served. (A
    batch request arriving at a room full of critical ones is refused: tests/unit/test_access.py.)"""
    import asyncio

    long = client(guarded, "acme").completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=ROW_TOKENS, temperature=0)
    assert long.choices[0].finish_reason == "length"  # a greedy answer that keeps a row busy for ROW_TOKENS steps

    async def overload():
        def aclient(tenant):
            return openai.AsyncOpenAI(base_url=guarded["info"]["openai"], api_key=guarded["key"][tenant][1], max_retries=0, timeout=120)

        async def one(c, cls):
            try:
                answer = await c.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=ROW_TOKENS, temperature=0)
                return cls, 200, answer.choices[0].finish_reason
            except openai.APIStatusError as e:
                return cls, e.status_code, e.body.get("message") if isinstance(e.body, dict) else str(e.body)

        bulk, ops = aclient("bulk"), aclient("ops")
        tasks = [asyncio.create_task(one(bulk, "batch")) for _ in range(6)]
        seen = []
        for _ in range(200):  # until 4 wait (the autoscaling gauge shows it); asked once more, rows could have ended
            await asyncio.sleep(0.02)
            seen.append(await asyncio.to_thread(waiting, guarded))
            if seen[-1] == 4:
                break
        assert seen[-1] == 4, seen
        tasks += [asyncio.create_task(one(ops, "critical")) for _ in range(4)]
        return await asyncio.gather(*tasks)

    results = asyncio.run(overload())
    critical = [r for r in results if r[0] == "critical"]
    batch = [r for r in results if r[0] == "batch"]
    assert [r[1] for r in critical] == [200] * 4, results
    # each critical arrival found the room full and pushed out a waiting batch request (4 when all
    # arrive before the 2 running rows end, a few seconds here; fewer if a row freed first)
    pushed = [r for r in batch if r[1] == 503]
    assert all("a higher-priority request took its place" in str(r[2]) for r in pushed) and 1 <= len(pushed) <= 4, results
    assert all(r[1] in (200, 503) for r in batch), results


def test_one_metrics_endpoint_carries_gateway_and_model_metrics_and_passes_promtool(guarded):
    """The OpenAI port's /metrics (no key: Prometheus has none) holds the gateway's metrics and the
    Triton model's, the autoscaling gauges among them, in a form `promtool check metrics` accepts."""
    import subprocess
    import urllib.request

    from tests.integration.test_manifests import promtool

    url = guarded["info"]["openai"].removesuffix("/v1") + "/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for name in ("kiln_gateway_requests_total", "kiln_gateway_tenant_requests_total", "kiln_gateway_rate_limited_total",
                 "kiln_request_log_records", "kiln_requests_waiting", "kiln_batch_utilization", "kiln_requests_refused_total"):
        assert f"\n{name}{{" in text or f"\n{name} " in text, name
    # Kiln's own metrics lint clean; Triton's nv_* names break promtool's naming rules (counters
    # without _total, "_us" units), which is Triton's to change, but must still parse
    ours = "".join(line for line in text.splitlines(keepends=True) if not line.removeprefix("# HELP ").removeprefix("# TYPE ").startswith("nv_"))
    checked = subprocess.run([promtool(), "check", "metrics"], input=ours, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    whole = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True)
    assert all(line.startswith("nv_") for line in whole.stderr.splitlines()), whole.stderr
    health = urllib.request.urlopen(url.removesuffix("/metrics") + "/health", timeout=10)
    assert health.status == 200 and json.loads(health.read())["status"] == "ok"


def test_a_client_that_leaves_a_stream_frees_its_slot_at_once(guarded):
    """Its concurrency slot, its log record and the model's row end when it goes, not when the
    garbage collector finds the stream."""
    single = client(guarded, "single")
    # ROW_TOKENS: with 220 the stream could end before the client left, and was then logged as finished (seen once)
    stream = single.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=ROW_TOKENS, stream=True, temperature=0)
    next(iter(stream))
    with pytest.raises(openai.RateLimitError):  # max_concurrent 1, and the stream still runs
        single.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    stream.close()
    deadline, answer = time.monotonic() + 5, None
    while answer is None:
        try:
            answer = single.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the slot of a client that left was not freed within 5 s"
            time.sleep(0.05)
    records = [json.loads(line) for line in guarded["log"].read_text().splitlines()]
    assert any(r["tenant"] == "single" and r["finish_reason"] == "disconnected" for r in records)


def test_a_key_added_while_serving_works_and_a_revoked_one_stops(guarded):
    key_id, key = add_key(guarded["keys"], "acme", guarded["artifacts"])
    assert client(guarded, key=key).completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens >= 1
    run_kiln("keys", "revoke", str(guarded["keys"]), key_id, artifacts=guarded["artifacts"], check=True)
    with pytest.raises(openai.AuthenticationError):
        client(guarded, key=key).completions.create(model=MODEL, prompt="hi", max_tokens=2)


def test_the_request_log_records_each_request_and_shows_tampering(guarded):
    stream = client(guarded, "acme").completions.create(model=MODEL, prompt="def f():", max_tokens=4, stream=True,
                                                        extra_headers={"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"})
    assert "".join(c.choices[0].text for c in stream)
    log = guarded["log"]
    text = log.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    assert {r["status"] for r in records} >= {200, 401, 404, 429}
    for _, key in guarded["key"].values():
        assert key not in text and key.split("-", 2)[2] not in text  # key ids only, never a key
    assert "prompt" not in records[0]  # prompts only when the operator opts in
    last = records[-1]
    assert (last["tenant"], last["key_id"], last["model"], last["version"]) == ("acme", guarded["key"]["acme"][0], MODEL, f"{MODEL}/1")
    assert last["completion_tokens"] >= 1 and last["trace_id"] == "ab" * 16 and last["finish_reason"] in ("length", "eos")
    ok = run_kiln("audit", "verify", str(log), artifacts=guarded["artifacts"])
    assert ok.returncode == 0 and f"{len(records)} records, chain intact" in ok.stdout
    lines = text.splitlines(keepends=True)
    copy = guarded["root"] / "edited.jsonl"
    for tampered, line in ((lines[:1] + [lines[1].replace('"status":', '"status": ')] + lines[2:], 2),
                           (lines[:2] + lines[3:], 3), (lines[:2] + [lines[3], lines[2]] + lines[4:], 3)):
        copy.write_text("".join(tampered))
        bad = run_kiln("audit", "verify", str(copy), artifacts=guarded["artifacts"])
        assert bad.returncode == 6 and f"line {line}" in bad.stdout, bad.stdout
