"""`kiln serve --otlp-endpoint`: one trace per request from the gateway through tritonserver into
the model's decode loop, received by an OTLP/HTTP collector written here (protobuf, as the
OpenTelemetry SDK and Triton's exporter send it), a cancelled stream included."""

from __future__ import annotations

import gzip
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.integration.test_triton import MODEL, kiln_serving, serving_environment

pytestmark = pytest.mark.integration
openai = pytest.importorskip("openai", reason="the openai client comes with the test extra (pip install -e .[test])")


def protobuf_spans(body: bytes) -> list[tuple]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    out = []
    for resource in ExportTraceServiceRequest.FromString(body).resource_spans:
        service = next((a.value.string_value for a in resource.resource.attributes if a.key == "service.name"), "")
        for scope in resource.scope_spans:
            for s in scope.spans:
                attrs = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in s.attributes if a.value.WhichOneof("value")}
                out.append((service, s.name, s.trace_id.hex(), s.parent_span_id.hex(), s.span_id.hex(), attrs))
    return out


def json_spans(body: bytes) -> list[tuple]:
    out = []
    for resource in json.loads(body)["resourceSpans"]:
        service = next((a["value"].get("stringValue") for a in resource["resource"]["attributes"] if a["key"] == "service.name"), "")
        for scope in resource.get("scopeSpans", []):
            for s in scope["spans"]:
                attrs = {a["key"]: next(iter(a["value"].values()), None) for a in s.get("attributes", [])}
                out.append((service, s["name"], s["traceId"].lower(), s.get("parentSpanId", "").lower(), s["spanId"].lower(), attrs))
    return out


class Collector:
    """An OTLP/HTTP traces receiver: every span it got, as (service, name, trace id, parent span id, span id, attributes)."""

    def __init__(self):
        spans, lock = [], threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                # the Python SDK sends protobuf; Triton's C++ exporter sends OTLP/JSON (ids in hex)
                found = json_spans(body) if "json" in self.headers.get("content-type", "") else protobuf_spans(body)
                with lock:
                    spans.extend(found)
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.spans = spans
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def of_trace(self, trace_id: str, wait_for: set[str], timeout: float = 30) -> list[tuple]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [s for s in list(self.spans) if s[2] == trace_id]
            if wait_for <= {s[1] for s in found}:
                return found
            time.sleep(0.2)
        return [s for s in list(self.spans) if s[2] == trace_id]


@pytest.fixture(scope="module")
def traced(tiny_run):
    serving_environment()
    collector = Collector()
    with kiln_serving(f"models:/{MODEL}/1", tiny_run["artifacts"], tiny_run["registered"]["tracking_uri"],
                      "--otlp-endpoint", collector.url) as (info, lines):
        yield info, collector
    collector.server.shutdown()


def traceparent(trace_id: str) -> str:
    return f"00-{trace_id}-{'1' * 16}-01"


MODEL_SPANS = {"kiln.generate", "kiln.queue", "kiln.prefill", "kiln.decode"}


def test_one_trace_spans_gateway_triton_and_the_model(traced):
    info, collector = traced
    client = openai.OpenAI(base_url=info["openai"], api_key="unused", max_retries=0, timeout=60)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    answer = client.completions.create(model=MODEL, prompt="def main():", max_tokens=6, temperature=0,
                                       extra_headers={"traceparent": traceparent(trace_id)})
    spans = collector.of_trace(trace_id, {f"text_completion {MODEL}"} | MODEL_SPANS)
    by_name = {s[1]: s for s in spans}
    services = {s[0] for s in spans}
    assert {"kiln-gateway", "kiln-triton", "kiln-model"} <= services, spans
    server = by_name[f"text_completion {MODEL}"]
    assert server[3] == "1" * 16  # the caller's span is its parent
    attrs = server[5]
    assert attrs["gen_ai.request.model"] == MODEL and attrs["gen_ai.response.model"] == f"{MODEL}/1"
    assert attrs["gen_ai.usage.output_tokens"] == answer.usage.completion_tokens and attrs["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens
    # Triton's spans hang under the gateway's, the model's under Triton's; the phases under kiln.generate
    triton = [s for s in spans if s[0] == "kiln-triton"]
    assert any(s[3] == server[4] for s in triton), triton
    generate = by_name["kiln.generate"]
    assert generate[3] in {s[4] for s in triton}
    assert {by_name[n][3] for n in ("kiln.queue", "kiln.prefill", "kiln.decode")} == {generate[4]}
    assert generate[5]["gen_ai.usage.output_tokens"] == answer.usage.completion_tokens


def test_a_cancelled_stream_is_traced_too(traced):
    info, collector = traced
    client = openai.OpenAI(base_url=info["openai"], api_key="unused", max_retries=0, timeout=60)
    trace_id = "5c" * 16
    stream = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=60, stream=True, temperature=0,
                                       extra_headers={"traceparent": traceparent(trace_id)})
    next(iter(stream))
    stream.close()  # the client goes away mid-answer
    spans = collector.of_trace(trace_id, {f"text_completion {MODEL}", "kiln.generate"})
    by_name = {s[1]: s for s in spans}
    assert {"kiln-gateway", "kiln-triton", "kiln-model"} <= {s[0] for s in spans}, spans
    def reasons(span) -> list[str]:
        return [v.string_value for v in span[5]["gen_ai.response.finish_reasons"].values]

    # the gateway saw its client leave; the model stopped the request within a step
    assert reasons(by_name[f"text_completion {MODEL}"]) == ["disconnected"]
    assert reasons(by_name["kiln.generate"]) == ["cancelled"] and by_name["kiln.generate"][5]["gen_ai.usage.output_tokens"] < 60
