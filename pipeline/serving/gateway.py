"""An OpenAI-compatible HTTP API in front of Kiln's Triton model: `/v1/models`, `/v1/completions`
and `/v1/chat/completions`, whole or streamed as server-sent events.

Glue only: FastAPI (served by uvicorn) takes the request, the model's own chat template (from its
engine folder, rendered in Jinja's sandbox as transformers does) turns messages into a prompt, and
tritonclient's asyncio gRPC stream carries it to Triton and the text back. Generation itself, its
checks and its limits are the Triton model's: a request it refuses comes back as a 400 with its
reason, "server busy" as a 503. A client that disconnects mid-stream closes the gRPC stream, which
cancels the request in Triton. Bodies over `max_body_bytes` get a 413 before anything reads them.

Which served version answers is the router's choice (routing.py): one pinned version, or every
alias of a registered model with a canary split (fleet.py). Every response's `model` is the
registry reference `NAME/VERSION` of the version that produced it, also in the `X-Kiln-Version`
header (and the alias that chose it in `X-Kiln-Alias`). `/metrics` on the same port counts
requests, tokens and time to first token per model, alias and version (Prometheus), and carries
Triton's metrics too; `/health` answers probes.

With `kiln serve --keys` every request needs an API key (tenants.py: 401, 404 for a model the key
may not call, 429 over a limit) and carries its tenant's priority class to the model; with
`--request-log` each request ends in one hash-chained record (request_log.py); with
`--otlp-endpoint` it is one span of a trace that goes on into Triton and the model (tracing.py).
A `Ticket` follows each request to its end, which happens once whichever way it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.serving.routing import Choice, Router, Routes

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """The OpenAI parameters Kiln's model understands; others are refused by name (extra=forbid),
    except a few clients send by default and that change nothing here."""

    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = None  # the caller's identity: a canary split keeps one user on one version
    presence_penalty: float = Field(0.0, ge=0, le=0)  # only the neutral value
    frequency_penalty: float = Field(0.0, ge=0, le=0)
    # Kiln's own (OpenAI clients send it in extra_body): false turns the package's speculative
    # decoding off for this request; the text is the same either way
    speculative: bool = True

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(Sampling):
    prompt: str


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code, self.headers = status, message, kind, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def not_found(requested: str) -> ApiError:
    """OpenAI's answer for a model that does not exist or that this key may not call: the same
    either way, so a tenant learns nothing of other tenants' models."""
    return ApiError(404, f"The model `{requested}` does not exist or you do not have access to it.", param="model",
                    code="model_not_found")


def trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C `traceparent` header (version-traceid-parentid-flags), else None."""
    parts = (traceparent or "").strip().split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and all(c in "0123456789abcdef" for c in parts[1]) and parts[1] != "0" * 32:
        return parts[1]
    return None


@dataclass
class Ticket:
    """One request from arrival to its last byte: the caller, what answered, and the end, which
    happens once (slot released, tokens charged, one request-log record)."""

    request: Any  # the starlette Request
    tenants: Any  # tenants.Tenants or None
    log: Any  # request_log.RequestLog or None
    tracing: Any = None  # tracing.GatewayTracing or None
    span: Any = None  # the request's server span while tracing
    caller: Any = None  # tenants.Caller once authenticated
    admitted: bool = False
    model: str | None = None
    choice: Choice | None = None
    prompt: str | None = None
    ended: bool = False

    def end(self, status: int, summary: dict | None = None, finish: str | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        tokens = summary["prompt_tokens"] + summary["completion_tokens"] if summary else 0
        if self.admitted:
            self.tenants.release(self.caller, tokens)
        if self.span is not None:
            self.tracing.end(self.span, status, summary, finish, **{
                "gen_ai.request.model": self.model, "gen_ai.response.model": self.choice.target.model_id if self.choice else None,
                "kiln.alias": self.choice.alias if self.choice else None, "kiln.tenant": self.caller.tenant if self.caller else None})
        if self.log is not None:
            self.log.append(tenant=self.caller.tenant if self.caller else None, key_id=self.caller.key_id if self.caller else None,
                            model=self.model, alias=self.choice.alias if self.choice else None,
                            version=self.choice.target.model_id if self.choice else None, status=status,
                            finish_reason=finish or (summary or {}).get("finish_reason"),
                            prompt_tokens=summary["prompt_tokens"] if summary else None,
                            completion_tokens=summary["completion_tokens"] if summary else None,
                            trace_id=self.tracing.trace_id(self.span) if self.span is not None
                            else trace_id(self.request.headers.get("traceparent")), prompt=self.prompt)


def chat_template(engine_dir: Path) -> str | None:
    """The model's chat template: `chat_template.jinja` (transformers 5), else tokenizer_config.json."""
    file = engine_dir / "chat_template.jinja"
    if file.is_file():
        return file.read_text()
    config = engine_dir / "tokenizer_config.json"
    template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    return template if isinstance(template, str) else None


def special_tokens(engine_dir: Path) -> dict[str, str]:
    config = engine_dir / "tokenizer_config.json"
    doc = json.loads(config.read_text()) if config.is_file() else {}
    return {k: v for k in ("bos_token", "eos_token") if isinstance(v := doc.get(k), str)}


@dataclass
class Served:
    """What the gateway fronts: one Triton model, its registry identity, its chat template."""

    grpc_url: str
    triton_model: str
    model_id: str  # NAME/VERSION: the `model` of every response
    template: str | None
    tokens: dict[str, str]
    # the inputs its config.pbtxt declares: packages before issue 26 lack `priority` and `tenant`,
    # before issue 27 `speculative`; what a package lacks is not sent
    inputs: frozenset[str] = frozenset()

    @classmethod
    def from_repository(cls, grpc_url: str, repository: Path, model: str, name: str, version: str) -> "Served":
        version_dir = next(p for p in (repository / model).iterdir() if p.is_dir())
        engine = version_dir / "engine"
        inputs = frozenset(re.findall(r'name: "([^"]+)"', (repository / model / "config.pbtxt").read_text()))
        return cls(grpc_url, model, f"{name}/{version}", chat_template(engine), special_tokens(engine), inputs)

    @functools.cached_property
    def compiled_template(self):
        """The chat template compiled once (in Jinja's sandbox), not on every request."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(self.template)

    def render(self, messages: list[ChatMessage]) -> str:
        if self.template is None:
            raise ApiError(400, f"{self.model_id} has no chat template; use /v1/completions with a prompt", param="messages")
        from jinja2.exceptions import TemplateError

        try:
            return self.compiled_template.render(messages=[m.model_dump() for m in messages], add_generation_prompt=True, **self.tokens)
        except TemplateError as e:
            raise ApiError(400, f"the model's chat template failed on these messages: {e}", param="messages") from None


def triton_inputs(prompt: str, req: Sampling, priority: tuple[int, str] | None = None, declared: frozenset[str] = frozenset()) -> list:
    """`priority`: (class rank, tenant) of the caller's key; `declared`: the model's inputs (an
    optional input it does not declare is not sent)."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    def tensor(name, dtype, values, np_dtype):
        t = grpcclient.InferInput(name, [len(values)], dtype)
        t.set_data_from_numpy(np.array(values, dtype=np_dtype))
        return t

    inputs = [tensor("text_input", "BYTES", [prompt.encode()], object), tensor("stream", "BOOL", [True], bool),
              tensor("temperature", "FP32", [req.temperature], np.float32), tensor("top_p", "FP32", [req.top_p], np.float32)]
    if req.limit() is not None:
        inputs.append(tensor("max_tokens", "INT32", [min(req.limit(), 2**31 - 1)], np.int32))
    if req.seed is not None:
        inputs.append(tensor("seed", "UINT64", [req.seed], np.uint64))
    if not req.speculative and "speculative" in declared:  # an older package does not speculate at all
        inputs.append(tensor("speculative", "BOOL", [False], bool))
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if stops:
        inputs.append(tensor("stop", "BYTES", [s.encode() for s in stops], object))
    if priority is not None and "priority" in declared:
        inputs += [tensor("priority", "INT32", [priority[0]], np.int32), tensor("tenant", "BYTES", [priority[1].encode()], object)]
    return inputs


class TritonClients:
    """One asyncio gRPC client per Triton address for the app's lifetime, its streams ending on
    their own. A client per request, closed the moment the final response arrived, is a cancellation
    racing the request's completion in tritonserver 2.51, which then kept a stream state referencing
    the model: an unloaded version stayed UNLOADING for ever (measured: 60 sequential requests that
    way left it stuck; 320 over one shared client, 16 at a time, unloaded at once)."""

    def __init__(self):
        self.clients: dict[str, Any] = {}

    def get(self, url: str):
        import tritonclient.grpc.aio as grpcaio

        if url not in self.clients:
            self.clients[url] = grpcaio.InferenceServerClient(url)
        return self.clients[url]

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()
        self.clients.clear()


async def generate(client, served: Served, prompt: str, req: Sampling, priority: tuple[int, str] | None = None,
                   metadata: dict[str, str] | None = None) -> AsyncIterator[tuple[str, dict | None]]:
    """Text pieces from Triton, then ("", summary) with finish_reason and token counts. The stream
    ends by itself after the final response; leaving the iteration before that (a disconnected
    client) cancels the gRPC stream, and so the request."""

    async def one_request():
        yield {"model_name": served.triton_model,
               "inputs": triton_inputs(prompt, req, priority, served.inputs)}

    responses = client.stream_infer(inputs_iterator=one_request(), headers=metadata)  # metadata: a trace's context
    ended, refused = False, None
    try:
        async for result, error in responses:
            if error is not None:  # a refusal is the request's final response: the stream ends after it
                refused = str(error.message() if hasattr(error, "message") else error)
                continue
            finish = result.as_numpy("finish_reason")
            if finish is None:
                yield result.as_numpy("text_output")[0].decode("utf-8"), None
                continue
            summary = {"finish_reason": finish[0].decode(), "prompt_tokens": int(result.as_numpy("prompt_tokens")[0]),
                       "completion_tokens": int(result.as_numpy("completion_tokens")[0])}
            for name in ("accepted_draft_tokens", "rejected_draft_tokens"):  # packages built before speculation lack them
                value = result.as_numpy(name)
                if value is not None:
                    summary[name] = int(value[0])
            yield result.as_numpy("text_output")[0].decode("utf-8"), summary
        ended = True
    finally:
        if not ended:
            responses.cancel()
    if refused is not None:
        busy = "server busy" in refused or "server shutting down" in refused  # retry elsewhere or later
        raise ApiError(503 if busy else 400, refused, kind="server_error" if busy else "invalid_request_error")


class ClosingStreamingResponse(StreamingResponse):
    """A stream whose end runs `on_close` at once, however it ends. Starlette leaves a body
    generator suspended at its `yield` when the client goes away (the disconnect cancels the send,
    not the generator), so its `finally` ran only when the garbage collector got to it: the gRPC
    stream stayed open, the model generated on for nobody, and the request's concurrency slot,
    log record and span waited (measured: a cancelled stream's span missing after 30 s)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        import anyio

        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):  # runs even while the request's task is being cancelled
                await self.body_iterator.aclose()  # the generator's own `finally`, now
                await self.on_close()


def usage(summary: dict) -> dict:
    """OpenAI's `usage`; drafted tokens of speculative decoding as OpenAI counts predicted-output
    tokens (`completion_tokens_details.accepted_prediction_tokens` / `rejected_prediction_tokens`)."""
    answer = {"prompt_tokens": summary["prompt_tokens"], "completion_tokens": summary["completion_tokens"],
              "total_tokens": summary["prompt_tokens"] + summary["completion_tokens"]}
    if summary.get("accepted_draft_tokens") or summary.get("rejected_draft_tokens"):
        answer["completion_tokens_details"] = {"accepted_prediction_tokens": summary["accepted_draft_tokens"],
                                               "rejected_prediction_tokens": summary["rejected_draft_tokens"]}
    return answer


class GatewayMetrics:
    """Per model, alias and version: requests by HTTP status, prompt and completion tokens, time to
    first token, so a canary can be judged on a dashboard (Prometheus text at `/metrics`)."""

    def __init__(self, registry):
        from prometheus_client import Counter, Histogram

        labels = ["model", "alias", "version"]
        self.requests = Counter("kiln_gateway_requests", "OpenAI API requests answered, by HTTP status", [*labels, "status"],
                                registry=registry)
        self.prompt_tokens = Counter("kiln_gateway_prompt_tokens", "Prompt tokens of answered requests", labels, registry=registry)
        self.completion_tokens = Counter("kiln_gateway_completion_tokens", "Generated tokens", labels, registry=registry)
        self.ttft = Histogram("kiln_gateway_time_to_first_token_seconds", "From request to first text (or whole answer)",
                              labels, registry=registry, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

    @staticmethod
    def labels(choice: Choice) -> tuple[str, str, str]:
        return choice.target.model_id.split("/")[0], choice.alias, choice.version

    def answered(self, choice: Choice, status: int) -> None:
        self.requests.labels(*self.labels(choice), str(status)).inc()

    def first_token(self, choice: Choice, seconds: float) -> None:
        self.ttft.labels(*self.labels(choice)).observe(seconds)

    def finished(self, choice: Choice, summary: dict | None) -> None:
        if summary is not None:
            self.prompt_tokens.labels(*self.labels(choice)).inc(summary["prompt_tokens"])
            self.completion_tokens.labels(*self.labels(choice)).inc(summary["completion_tokens"])


def pinned_router(served: Served) -> Router:
    """A router that answers one version whatever alias it had: `kiln serve NAME@ALIAS`, `NAME/VERSION`
    or a package folder, as served before the server followed the registry."""
    name, version = served.model_id.split("/")
    router = Router()
    router.publish(Routes(name, {}, {version: served}, newest=version, newest_label="pinned"))
    return router


def create_app(router: Router, max_body_bytes: int = 1 << 20, registry=None, tenants=None, request_log=None,
               triton_metrics: str | None = None, tracing=None) -> FastAPI:
    """`registry`: the Prometheus CollectorRegistry `/metrics` shows (the fleet adds its own metrics to it);
    `triton_metrics`: Triton's metrics URL, whose text `/metrics` appends (the model's queue and
    batch gauges beside the gateway's: one scrape target for a HorizontalPodAutoscaler).
    `tracing` (tracing.GatewayTracing): a server span per request, its context sent on to Triton.
    `tenants` (tenants.Tenants): API keys, model grants and limits, checked on every request; None:
    open to anyone who reaches the port. `request_log` (request_log.RequestLog): one chained record
    per completion request."""
    from fastapi.responses import Response
    from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    from pipeline.serving.tenants import PRIORITIES, AuthError, Limited, may_call

    registry = registry if registry is not None else CollectorRegistry()
    metrics = GatewayMetrics(registry)
    clients = TritonClients()
    by_tenant = Counter("kiln_gateway_tenant_requests", "OpenAI API requests by tenant and HTTP status", ["tenant", "status"],
                        registry=registry)
    limited = Counter("kiln_gateway_rate_limited", "Requests refused with 429, by tenant and the limit reached", ["tenant", "limit"],
                      registry=registry)
    if request_log is not None:
        Gauge("kiln_request_log_records", "Records in the request log (its seq): compare with a copy kept elsewhere",
              registry=registry).set_function(lambda: request_log.seq)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await clients.close()

    # (FastAPI reads the handlers' annotations, so Request is imported at module level)
    app = FastAPI(title="Kiln OpenAI-compatible API", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.middleware("http")
    async def cap_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            return JSONResponse(ApiError(413, f"request body over {max_body_bytes} bytes").body(), status_code=413)
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    def authenticate(request: Request):
        if tenants is None:
            return None
        try:
            return tenants.authenticate(request.headers.get("authorization"))
        except AuthError as e:
            raise ApiError(401, str(e), code="invalid_api_key") from None

    async def parse(request: Request, model: type[Sampling], ticket: Ticket) -> Sampling:
        raw = await request.body()
        if len(raw) > max_body_bytes:  # chunked bodies have no content-length
            raise ApiError(413, f"request body over {max_body_bytes} bytes")
        try:
            parsed = model.model_validate_json(raw)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or None
            raise ApiError(400, f"{where}: {first['msg']}" if where else first["msg"], param=where) from None
        ticket.model = parsed.model
        if ticket.span is not None:  # the GenAI conventions' span name: "{operation} {model}"
            ticket.span.update_name(f"{'chat' if model is ChatRequest else 'text_completion'} {parsed.model}")
        if ticket.caller is not None and not may_call(ticket.caller.config.models, parsed.model):
            raise not_found(parsed.model)
        try:
            ticket.choice = router.choose(parsed.model, parsed.user or request.headers.get("authorization"))
        except LookupError as e:
            # with keys, the same answer as a model the key may not call (no list of what is served)
            raise (not_found(parsed.model) if ticket.caller is not None else
                   ApiError(404, str(e), kind="not_found_error", param="model")) from None
        return parsed

    def admit(ticket: Ticket) -> None:
        if ticket.caller is None:
            return
        try:
            tenants.admit(ticket.caller)
        except Limited as e:
            limited.labels(ticket.caller.tenant, e.limit).inc()
            raise ApiError(429, str(e), kind=e.limit, code="rate_limit_exceeded",
                           headers={"Retry-After": str(e.retry_after), **tenants.remaining(ticket.caller)}) from None
        ticket.admitted = True

    @app.get("/v1/models")
    async def models(request: Request):
        caller = authenticate(request)
        routes = router.routes
        listing = routes.listing() if routes else []
        if caller is not None:
            listing = [e for e in listing if may_call(caller.config.models, e["id"])]
        return {"object": "list", "data": listing}

    def triton_text() -> bytes:
        import urllib.request

        try:
            with urllib.request.urlopen(triton_metrics, timeout=5) as r:
                return r.read()
        except OSError:
            return b""  # tritonserver not answering: the gateway's own metrics still go out

    @app.get("/metrics")
    async def prometheus():
        text = generate_latest(registry)
        if triton_metrics:
            text += await asyncio.to_thread(triton_text)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health():
        """No key needed (a probe has none): 200 once a version is loaded, 503 before."""
        loaded = router.routes is not None and bool(router.routes.targets)
        return JSONResponse({"status": "ok" if loaded else "loading"}, status_code=200 if loaded else 503)

    async def respond(req: Sampling, ticket: Ticket, prompt: str, chat: bool):
        choice = ticket.choice
        served: Served = choice.target
        headers = {"X-Kiln-Version": served.model_id, "X-Kiln-Alias": choice.alias,
                   **(tenants.remaining(ticket.caller) if ticket.caller is not None else {})}
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        started = time.perf_counter()
        obj = "chat.completion" if chat else "text_completion"
        ticket.prompt = prompt
        caller = ticket.caller
        priority = (PRIORITIES.index(caller.config.priority), caller.tenant) if caller is not None else None
        metadata = tracing.metadata(ticket.span) if ticket.span is not None else None
        pieces = generate(clients.get(served.grpc_url), served, prompt, req, priority, metadata)
        try:
            # the first piece is awaited before the response starts, so a refused request is a plain 4xx/503
            first = await anext(pieces)
        except ApiError as e:
            metrics.answered(choice, e.status)
            raise
        metrics.first_token(choice, time.perf_counter() - started)
        metrics.answered(choice, 200)
        if ticket.span is not None:
            ticket.span.set_attribute("kiln.time_to_first_token_s", time.perf_counter() - started)
        if not req.stream:
            (text, summary) = first
            async for piece, info in pieces:
                text, summary = text + piece, info or summary
            metrics.finished(choice, summary)
            ticket.end(200, summary)
            reason = FINISH[summary["finish_reason"]]
            choice_body = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason} if chat
                           else {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
            return JSONResponse({"id": ident, "object": obj, "created": created, "model": served.model_id, "choices": [choice_body],
                                 "usage": usage(summary)}, headers=headers)

        def event(choices: list, **extra) -> str:
            body = {"id": ident, "object": f"{obj}.chunk" if chat else obj, "created": created, "model": served.model_id,
                    "choices": choices, **extra}
            return f"data: {json.dumps(body)}\n\n"

        def chunk(delta: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                content = {"role": "assistant", "content": delta or ""} if role else ({"content": delta} if delta else {})
                return event([{"index": 0, "delta": content, "finish_reason": finish}])
            return event([{"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}])

        async def events():
            piece, summary = first
            try:
                yield chunk(piece, None, role=True)
                async for piece, info in pieces:
                    summary = info or summary
                    if piece:
                        yield chunk(piece, None)
            finally:  # also when the client went away: close the gRPC stream now, which cancels the request
                await pieces.aclose()
                # a stream the client left: status 200 was sent; no summary, "disconnected"
                ticket.end(200, summary, None if summary else "disconnected")
            metrics.finished(choice, summary)
            yield chunk(None, FINISH[summary["finish_reason"]])
            if req.stream_options and req.stream_options.include_usage:
                yield event([], usage=usage(summary))
            yield "data: [DONE]\n\n"

        async def closed():  # a stream that never started: nothing of `events` ran
            await pieces.aclose()
            ticket.end(200, None, "disconnected")

        return ClosingStreamingResponse(events(), closed, media_type="text/event-stream", headers=headers)

    async def handle(request: Request, model: type[Sampling], chat: bool):
        ticket = Ticket(request, tenants, request_log, tracing)
        if tracing is not None:
            ticket.span = tracing.start(request.headers, "chat" if chat else "text_completion")
        try:
            ticket.caller = authenticate(request)
            req = await parse(request, model, ticket)
            admit(ticket)
            prompt = ticket.choice.target.render(req.messages) if chat else req.prompt
            response = await respond(req, ticket, prompt, chat)
        except ApiError as e:
            ticket.end(e.status)
            if ticket.caller is not None:
                by_tenant.labels(ticket.caller.tenant, str(e.status)).inc()
            raise
        except BaseException:
            ticket.end(500)
            raise
        if ticket.caller is not None:
            by_tenant.labels(ticket.caller.tenant, "200").inc()
        return response

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, CompletionRequest, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, ChatRequest, chat=True)

    return app


def run_gateway(router: Router, host: str, port: int, max_body_bytes: int = 1 << 20, registry=None, tenants=None,
                request_log=None, triton_metrics: str | None = None, tracing=None) -> Any:
    """The gateway on uvicorn in a daemon thread (a `server.RunningApp`), returned once it listens."""
    from pipeline.serving.server import run_app

    return run_app(create_app(router, max_body_bytes, registry, tenants, request_log, triton_metrics, tracing), host, port,
                   "--openai-port (0: none)", "the OpenAI-compatible API")
