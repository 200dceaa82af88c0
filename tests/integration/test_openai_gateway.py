"""`kiln serve`'s OpenAI-compatible API, spoken to only with the official `openai` client: models,
chat and text completions (streamed and whole) with usage and finish reasons, the model's own chat
template applied, the registry reference as `model`, and bad requests refused with their reason."""

from __future__ import annotations

import pytest

from tests.integration.test_triton import MODEL, engine_greedy_text, kiln_serving, serving_environment

pytestmark = pytest.mark.integration
openai = pytest.importorskip("openai", reason="the openai client comes with the test extra (pip install -e .[test])")


@pytest.fixture(scope="module")
def served(tiny_run):
    """`kiln serve models:/tiny-llama-int4/1` as a user runs it; yields (OpenAI client, model id, info)."""
    serving_environment()
    version = tiny_run["registered"]["version"]
    with kiln_serving(f"models:/{MODEL}/{version}", tiny_run["artifacts"], tiny_run["registered"]["tracking_uri"]) as (info, _):
        yield openai.OpenAI(base_url=info["openai"], api_key="unused", max_retries=0, timeout=60), f"{MODEL}/{version}", info


@pytest.fixture(scope="module")
def greedy(tiny_run):
    return engine_greedy_text(tiny_run["paths"]["build"], tiny_run["paths"]["package"], MODEL)


def chat_prompt(tiny_run, messages) -> str:
    from pipeline.serving.gateway import ChatMessage, Served, chat_template, special_tokens

    engine = tiny_run["paths"]["build"]
    served = Served("unused", MODEL, "m/1", chat_template(engine), special_tokens(engine))
    return served.render([ChatMessage(**m) for m in messages])


def test_models_lists_the_registered_version(served):
    client, model_id, _ = served
    # a pinned version answers its name and NAME/VERSION, both resolving to the same version
    assert [(m.id, m.root) for m in client.models.list().data] == [(MODEL, model_id), (model_id, model_id)]


def test_chat_streams_with_usage_and_finish_reason(served, tiny_run, greedy):
    client, model_id, _ = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is Python?"}]
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant" and all(c.model == model_id for c in chunks)
    prompt = chat_prompt(tiny_run, messages)
    assert "<|im_start|>assistant\n" in prompt  # the model's own (ChatML) template, with the generation prompt
    assert text == greedy(prompt, 8)
    assert finishes in (["length"], ["stop"])
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens <= 8 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    whole = client.chat.completions.create(model=model_id, messages=messages, max_tokens=8, temperature=0)
    assert whole.choices[0].message.content == text and whole.choices[0].finish_reason == finishes[0]
    assert whole.usage.completion_tokens == usage.completion_tokens and whole.model == model_id


def test_text_completion_with_stop_and_seed(served, greedy):
    client, model_id, _ = served
    plain = client.completions.create(model=MODEL, prompt="def main():", max_tokens=10, temperature=0)
    assert plain.choices[0].text == greedy("def main():", 10) and plain.model == model_id
    sampled = [client.completions.create(model=MODEL, prompt="Once", max_tokens=8, temperature=0.9, top_p=0.9, seed=5).choices[0].text
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # seeded
    # a stop string of plain ASCII from the greedy text (a random model's bytes often decode to U+FFFD,
    # which any incomplete character also shows as)
    full = client.completions.create(model=MODEL, prompt="hello", max_tokens=10, temperature=0).choices[0].text
    windows = [i for i in range(1, len(full) - 1) if full[i : i + 2].isascii() and full[i : i + 2].isprintable()]
    if windows:
        stop = full[windows[0] : windows[0] + 2]
        cut = client.completions.create(model=MODEL, prompt="hello", max_tokens=10, temperature=0, stop=[stop])
        assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_bad_requests_get_their_reason(served):
    client, _, _ = served
    with pytest.raises(openai.BadRequestError, match="max_tokens must be between 1 and 64"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10**6)
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    with pytest.raises(openai.APIStatusError) as too_big:
        client.completions.create(model=MODEL, prompt="a " * (3 << 20), max_tokens=2)
    assert too_big.value.status_code == 413
    assert client.completions.create(model=MODEL, prompt="still serving", max_tokens=2).choices[0].text is not None


def test_malformed_json_is_a_400_and_the_server_stays_ready(served):
    """What no SDK sends, so plain HTTP: a body that is not JSON, and one with ill-typed fields."""
    import json
    import urllib.error
    import urllib.request

    client, _, info = served
    for body in (b"{not json", json.dumps({"model": MODEL, "prompt": 3, "max_tokens": "many"}).encode()):
        req = urllib.request.Request(f"{info['openai']}/completions", data=body, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=30)
        assert refused.value.code == 400 and json.loads(refused.value.read())["error"]["type"] == "invalid_request_error"
    assert client.completions.create(model=MODEL, prompt="still here", max_tokens=2).choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("method", ["prompt_lookup", "draft"])
def test_speculative_decoding_streams_plain_decodings_text_and_counts_drafts_in_usage(tmp_path_factory, tiny_run, monkeypatch, method):
    """`package.speculative: {method: prompt_lookup}`, or `{method: draft}` with the tiny engine as
    its own draft model: the served text is the engine's plain greedy text,
    `usage.completion_tokens_details` counts accepted and rejected drafted tokens as OpenAI counts
    predicted-output tokens, and the model's counters show the verifications. A draft model travels
    in the package and the MLflow model, which generates the same text."""
    import json
    import urllib.request
    from pathlib import Path

    from tests.conftest import TINY_RECIPE, run_kiln

    serving_environment()
    artifacts = tmp_path_factory.mktemp("speculative")
    setting = ("{method: prompt_lookup}" if method == "prompt_lookup"
               else f"{{method: draft, draft_engine: {tiny_run['paths']['build']}}}")
    run_kiln("run", str(TINY_RECIPE), "--set", f"package.speculative={setting}", artifacts=artifacts, check=True)
    summary = json.loads((artifacts / "last_run.json").read_text())
    paths = {s["stage"]: Path(s["path"]) for s in summary["stages"]}
    report = json.loads((paths["validate"] / "validation.json").read_text())  # validate timed both ways
    assert report["metrics"]["speculative_speedup"] > 0 and report["speculative"]["drafts"]["verifications"] > 0
    assert report["speculative"]["settings"]["method"] == method and "greedy_identical" in report["speculative"]
    greedy = engine_greedy_text(paths["build"], paths["package"], MODEL)
    prompt = "def area(r):\n    return 3.14 * r * r\n\ndef area(r):\n"  # the tiny model repeats itself after it
    with kiln_serving(str(paths["package"]), artifacts) as (info, _):
        client = openai.OpenAI(base_url=info["openai"], api_key="unused", max_retries=0, timeout=60)
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        details = chunks[-1].usage.completion_tokens_details
        # the model brings its counters up before a stream's last message (CI once scraped between
        # the total and the by-position ones when it did so after): one read must be consistent
        metrics = urllib.request.urlopen(info["openai"].removesuffix("/v1") + "/metrics").read().decode()
        plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, extra_body={"speculative": False})
    # a request may turn the package's speculation off: the same text, no drafts
    assert plain.choices[0].text == greedy(prompt, 40) and not plain.usage.completion_tokens_details
    assert text == greedy(prompt, 40)
    assert details.accepted_prediction_tokens > 0 and details.rejected_prediction_tokens >= 0
    accepted = [line for line in metrics.splitlines() if line.startswith("kiln_speculative_accepted_tokens_total{")]
    assert accepted and float(accepted[0].split()[-1]) == details.accepted_prediction_tokens
    by_position = {(line.split("_tokens_by_position")[0].rsplit("_", 1)[-1], line.split('position="')[1].split('"')[0]): float(line.split()[-1])
                   for line in metrics.splitlines() if line.startswith("kiln_speculative_") and "_by_position_total{" in line}
    assert by_position[("accepted", "1")] <= by_position[("drafted", "1")] and by_position[("drafted", "1")] > 0
    assert sum(v for (kind, _), v in by_position.items() if kind == "accepted") == details.accepted_prediction_tokens
    if method == "draft":  # the registered MLflow model drafts with the packaged copy, checked against its digest
        import mlflow.pyfunc

        registered = summary["registered"]
        for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            monkeypatch.setenv(variable, registered["tracking_uri"])
        model = mlflow.pyfunc.load_model(f"models:/{registered['model_name']}/{registered['version']}")
        import pandas as pd

        assert model._model_impl.python_model.scheduler["draft_lm"] is not None
        assert model.predict(pd.DataFrame({"prompt": [prompt]}), params={"max_tokens": 40})["text"][0] == greedy(prompt, 40)
