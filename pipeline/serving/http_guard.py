"""The HTTP port `kiln serve` publishes: Triton's own KServe v2 HTTP API passed through, with a
cap on request bodies.

Why it exists (measured on tritonserver 2.51.0, gdb backtrace in docs/decisions.md): Triton's HTTP
frontend, libevhtp, parses a body sent as `application/x-www-form-urlencoded` (what `curl -d` and
Python's urllib send unless told otherwise) as a query string into two stack arrays of the body's
length (`evhtp_parse_query_wflags`), before Triton sees the request. A body over about 4 MiB
overflows the HTTP thread's 8 MiB stack and the whole server dies with SIGSEGV; the same body as
`application/json` is served (50 MB tried). Triton has no option that caps HTTP bodies. So
tritonserver's HTTP listens on loopback only, and this guard, on the published port:
  - answers a body over `max_body_bytes` with 400 and Triton's error shape `{"error": "..."}`
    (the rest of such a body is read and dropped first, so a client still sending reads the 400
    instead of a reset connection);
  - forwards form-typed bodies as `application/json` (KServe bodies are JSON or binary tensors;
    Triton never reads form fields), so no body reaches that parser whatever the cap is;
  - checks a `generate` / `generate_stream` body against the model's declared inputs first:
    tritonserver answers malformed JSON and values of the wrong JSON type with 500 and wraps an
    integer too large for INT32 into a negative one (measured: max_tokens 3000000000 arrived as
    -1294967296); here they are 400s naming the field;
  - passes everything else through unchanged (health, metadata, infer, generate, the
    `generate_stream` event stream), streamed both ways; 503 when tritonserver does not answer;
  - given `model_names` (`kiln serve models:/NAME`, which serves each registry version as the
    Triton model NAME-vVERSION), rewrites `/v2/models/NAME…` and `/v2/models/NAME@ALIAS…` to the
    version the alias points to now, so KServe clients follow promotions as OpenAI clients do;
  - closes its connection to tritonserver when the client disconnects mid-stream, which Triton
    takes as the request's cancellation (without that, the row decoded on for a client long gone).

Self-contained (uvicorn and httpx only, no Kiln imports) so a container can run this file beside
tritonserver: `python http_guard.py --listen 0.0.0.0:8000 --upstream http://127.0.0.1:8010`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re

import httpx

FORM = b"application/x-www-form-urlencoded"
DRAIN_LIMIT = 64 << 20  # past this, an oversized body is not read to the end: the connection just closes
# hop-by-hop headers (RFC 9110 §7.6.1) and those the HTTP libraries set themselves
REQUEST_DROP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
                b"host", b"content-length"}
RESPONSE_DROP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
GENERATE = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/generate(?:_stream)?")
MODEL_PATH = re.compile(r"/v2/models/([^/]+)(/.*)?")


def integer_range(datatype: str) -> tuple[int, int]:
    bits = int(datatype.removeprefix("U").removeprefix("INT"))
    return (0, 2**bits - 1) if datatype.startswith("U") else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def json_value_problem(value, datatype: str) -> str | None:
    """Why `value` cannot be an element of a tensor of KServe `datatype` (None: it can)."""
    if datatype == "BYTES":
        return None if isinstance(value, str) else "a string"
    if datatype == "BOOL":
        return None if isinstance(value, bool) else "true or false"
    if datatype.startswith("FP") or datatype == "BF16":
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if datatype.startswith(("INT", "UINT")):
        low, high = integer_range(datatype)
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        return None if ok else f"an integer from {low} to {high}"
    return None  # a type this check does not know: Triton's own parser decides


def generate_body_problem(body: bytes, inputs: dict[str, str]) -> str | None:
    """Why a generate body cannot be served as the model declares its inputs (None: let it through).
    Keys that are not inputs are request parameters, which Triton checks itself."""
    try:
        doc = json.loads(body)
    except ValueError as e:  # UnicodeDecodeError included
        return f"the request body is not JSON: {e}"
    except RecursionError:
        return "the request body nests JSON arrays or objects too deeply"
    if not isinstance(doc, dict):
        return "the request body must be a JSON object of input names and values"
    for name, value in doc.items():
        if name not in inputs:
            continue
        for element in value if isinstance(value, list) else [value]:
            if (wanted := json_value_problem(element, inputs[name])) is not None:
                return f"{name} must be {wanted} ({inputs[name]}), got {json.dumps(element)[:40]}"
    return None


class HttpGuard:
    """An ASGI app forwarding to tritonserver's HTTP address `upstream` (http://127.0.0.1:PORT)."""

    def __init__(self, upstream: str, max_body_bytes: int = 1 << 20, model_names=None):
        """`model_names`: a function from a model name in a request's path to the Triton model that
        serves it now (None: the name as it is)."""
        self.upstream, self.max_body_bytes, self.model_names = upstream.rstrip("/"), max_body_bytes, model_names
        self.client: httpx.AsyncClient | None = None  # made in the server's event loop, on first use
        self.inputs: dict[tuple[str, str | None], dict[str, str]] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.lifespan(receive, send)
        if scope["type"] != "http":
            return
        headers = {k.lower(): v for k, v in scope["headers"]}
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length and (not length.isdigit() or int(length) > DRAIN_LIMIT):
            return await self.error(send, self.too_big(length))
        body, size = bytearray(), 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= self.max_body_bytes:
                body += chunk
            elif size > DRAIN_LIMIT:
                break
            if not message.get("more_body"):
                break
        if size > self.max_body_bytes:
            return await self.error(send, self.too_big(size))
        forwarded = [(k, b"application/json" if k.lower() == b"content-type" and v.split(b";")[0].strip().lower() == FORM else v)
                     for k, v in scope["headers"] if k.lower() not in REQUEST_DROP]
        path, raw_path = scope["path"], scope.get("raw_path", scope["path"].encode()).decode("latin-1")
        if self.model_names is not None and (named := MODEL_PATH.fullmatch(path)) and (model := self.model_names(named[1])):
            path = raw_path = f"/v2/models/{model}{named[2] or ''}"
        url = self.upstream + raw_path
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        if self.client is None:
            # no read timeout: a stream lasts as long as its generation; connections as many as clients
            self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0), limits=httpx.Limits(max_connections=None))
        try:
            if scope["method"] == "POST" and (route := GENERATE.fullmatch(path)):
                inputs = await self.model_inputs(route[1], route[2])
                if inputs is not None and (problem := generate_body_problem(bytes(body), inputs)) is not None:
                    return await self.error(send, problem)
            response = await self.client.send(self.client.build_request(scope["method"], url, headers=forwarded, content=bytes(body)),
                                              stream=True)
        except httpx.HTTPError as e:
            return await self.error(send, f"tritonserver is not answering: {e}", status=503)

        async def relay():
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in RESPONSE_DROP]})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

        async def client_gone():
            while (await receive())["type"] != "http.disconnect":
                pass

        # A client that disconnects mid-stream: the connection to tritonserver is closed at once,
        # which Triton takes as the request's cancellation (the row stops within a step, measured)
        tasks = [asyncio.ensure_future(relay()), asyncio.ensure_future(client_gone())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if tasks[0].done() and not tasks[0].cancelled():
                tasks[0].exception()  # tritonserver or the client went away mid-response: nothing more to say
        except (httpx.HTTPError, OSError):
            pass
        finally:
            for task in tasks:
                task.cancel()
            await response.aclose()

    async def lifespan(self, receive, send):
        """ASGI lifespan: at shutdown the connections to tritonserver are closed (tritonserver's
        own shutdown otherwise waits up to 30 s for them)."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def too_big(self, size) -> str:
        return f"request body of {size} bytes is over this server's limit of {self.max_body_bytes} bytes (kiln serve --max-body-bytes)"

    async def model_inputs(self, model: str, version: str | None) -> dict[str, str] | None:
        """{input name: KServe datatype} from the model's metadata (asked once per model and
        version), None when tritonserver does not know the model (it answers the request itself)."""
        key = (model, version)
        if key not in self.inputs:
            path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
            response = await self.client.get(self.upstream + path)
            if response.status_code != 200:
                return None
            self.inputs[key] = {i["name"]: i["datatype"] for i in response.json().get("inputs", [])}
        return self.inputs[key]

    @staticmethod
    async def error(send, message: str, status: int = 400):
        body = json.dumps({"error": message}, separators=(",", ":")).encode()  # as tritonserver writes it
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Triton's KServe HTTP API behind a request-body cap")
    parser.add_argument("--listen", default="0.0.0.0:8000", help="HOST:PORT to publish")
    parser.add_argument("--upstream", default="http://127.0.0.1:8010", help="tritonserver's (loopback) HTTP address")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    uvicorn.run(HttpGuard(args.upstream, args.max_body_bytes), host=host, port=int(port), log_level="warning",
                timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
