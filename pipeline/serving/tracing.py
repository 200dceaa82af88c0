"""OpenTelemetry traces of `kiln serve --otlp-endpoint URL`: one trace per request, from the gateway
through tritonserver into the model's decode loop.

- the gateway (this module): a SERVER span per OpenAI request, continuing the caller's W3C
  `traceparent` when it sent one, named and attributed after the OpenTelemetry GenAI conventions
  (`gen_ai.operation.name`, `gen_ai.request.model`, `gen_ai.response.model`,
  `gen_ai.usage.input_tokens`/`output_tokens`, `gen_ai.response.finish_reasons`), plus Kiln's alias,
  version, tenant and time to first token; its context goes to Triton as gRPC metadata;
- tritonserver: its own OpenTelemetry spans (`--trace-config mode=opentelemetry`), children of the
  gateway's;
- the model (triton_model.py): `kiln.generate` with `kiln.queue`, `kiln.prefill` and `kiln.decode`
  children, under the context Triton hands it (`request.trace().get_context()`).

All three export OTLP/HTTP (protobuf) to the same endpoint. Off by default: without the option
nothing here is imported and no span is made.
"""

from __future__ import annotations

from typing import Any

TRACES_PATH = "/v1/traces"


def traces_url(endpoint: str) -> str:
    """OTLP/HTTP's traces URL for a collector endpoint (`http://collector:4318`), or the URL as given
    when it already names the path."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith(TRACES_PATH) else endpoint + TRACES_PATH


def tracer(endpoint: str, service: str):
    """A tracer exporting in batches to `endpoint` (its own provider: nothing global is set)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(endpoint)), schedule_delay_millis=1000))
    return provider, provider.get_tracer("kiln")


class GatewayTracing:
    """The gateway's spans; `start` → (span, gRPC metadata to send on), `end` once."""

    def __init__(self, endpoint: str):
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider, self.tracer = tracer(endpoint, "kiln-gateway")
        self.propagator = TraceContextTextMapPropagator()

    def start(self, headers, operation: str) -> Any:
        from opentelemetry.trace import SpanKind

        parent = self.propagator.extract({k.lower(): v for k, v in headers.items()})
        return self.tracer.start_span(operation, context=parent, kind=SpanKind.SERVER,
                                      attributes={"gen_ai.operation.name": operation, "gen_ai.provider.name": "kiln"})

    def metadata(self, span) -> dict[str, str]:
        from opentelemetry.trace import set_span_in_context

        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=set_span_in_context(span))
        return carrier

    @staticmethod
    def trace_id(span) -> str:
        return format(span.get_span_context().trace_id, "032x")

    @staticmethod
    def end(span, status: int, summary: dict | None, finish: str | None, **attributes) -> None:
        from opentelemetry.trace import Status, StatusCode

        span.set_attribute("http.response.status_code", status)
        for key, value in attributes.items():
            if value is not None:
                span.set_attribute(key, value)
        if summary:
            span.set_attribute("gen_ai.usage.input_tokens", summary["prompt_tokens"])
            span.set_attribute("gen_ai.usage.output_tokens", summary["completion_tokens"])
        if finish or summary:
            span.set_attribute("gen_ai.response.finish_reasons", [finish or summary["finish_reason"]])
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    def shutdown(self) -> None:
        self.provider.shutdown()  # flushes what is still queued


def triton_trace_options(endpoint: str) -> list[str]:
    """tritonserver's flags for OpenTelemetry traces of every request to `endpoint`."""
    return ["--trace-config", "mode=opentelemetry", "--trace-config", "rate=1", "--trace-config", "level=TIMESTAMPS",
            "--trace-config", f"opentelemetry,url={traces_url(endpoint)}",
            "--trace-config", "opentelemetry,resource=service.name=kiln-triton",
            "--trace-config", "opentelemetry,bsp_schedule_delay=1000"]


class ModelTracing:
    """The Triton model's spans (runs in the serving environment, as `kiln_tracing`): one
    `kiln.generate` per traced request with `kiln.queue`, `kiln.prefill` and `kiln.decode` children,
    written when the request ends, at the times it recorded (wall clock, nanoseconds)."""

    def __init__(self, endpoint: str):
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider, self.tracer = tracer(endpoint, "kiln-model")
        self.propagator = TraceContextTextMapPropagator()

    def parent(self, context_json: str | None):
        """The OpenTelemetry context of Triton's own span for this request (`request.trace().get_context()`)."""
        import json

        if not context_json:
            return None
        try:
            carrier = json.loads(context_json)
        except ValueError:
            return None
        return self.propagator.extract({str(k).lower(): str(v) for k, v in carrier.items()}) if isinstance(carrier, dict) else None

    def record(self, parent, times: dict[str, int | None], attributes: dict[str, Any]) -> None:
        """`times`: arrived, admitted, first_token, ended (ns; None where the request never got there)."""
        from opentelemetry.trace import set_span_in_context

        arrived, ended = times["arrived"], times["ended"]
        root = self.tracer.start_span("kiln.generate", context=parent, start_time=arrived,
                                      attributes={k: v for k, v in attributes.items() if v is not None})
        inside = set_span_in_context(root)
        phases = (("kiln.queue", arrived, times["admitted"] or ended),
                  ("kiln.prefill", times["admitted"], times["first_token"] or ended),
                  ("kiln.decode", times["first_token"], ended))
        for name, start, end in phases:
            if start is not None:
                self.tracer.start_span(name, context=inside, start_time=start).end(end_time=end)
        root.end(end_time=ended)

    def shutdown(self) -> None:
        self.provider.shutdown()
