"""What the gateway's controls cost per request (issue 26), side by side in one sitting:

    .venv/bin/python benchmarks/gateway_overhead.py artifacts/cache/package/<key> [--requests 60] [--rounds 3] \
        [--max-tokens 1 16] [--clients 8] [--seconds 15]

Three `kiln serve` processes on one package, started together and measured in turn (idle ones use
no CPU: their model's worker waits for a request):
  plain    no keys, no request log, no tracing (the default)
  keys     --keys (one tenant, limits far above the load) and --request-log
  traced   as plain, plus --otlp-endpoint to a collector in this process that accepts and drops
Per server and round: `--requests` sequential non-streamed completions of `--max-tokens` tokens
through the OpenAI port, and the same requests through Triton's gRPC port directly (tritonclient,
no gateway), alternating server by server; then, again alternating, `--clients` closed-loop
streaming clients for `--seconds` per round through the OpenAI port (tokens/s, TTFT). Printed: latency p50/p95 per path, the
gateway's added latency (OpenAI port p50 − Triton gRPC p50 of the same server), and each
configuration's ratio to plain.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from serve_openai import PROMPTS, closed_loops, stop, summary  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KILN = str(Path(sys.executable).parent / "kiln")


def discarding_collector() -> str:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def start(package: Path, base: int, options: list[str], artifacts: Path) -> tuple[subprocess.Popen, str, str]:
    import httpx

    env = {**os.environ, "KILN_ARTIFACTS": str(artifacts)}
    proc = subprocess.Popen([KILN, "serve", str(package), "--http-port", str(base), "--grpc-port", str(base + 1), "--metrics-port",
                             str(base + 2), "--openai-port", str(base + 3), *options], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # its own group: stop() ends tritonserver too
    url = f"http://127.0.0.1:{base + 3}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kiln serve {' '.join(options)} exited {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url, f"127.0.0.1:{base + 1}"
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError("kiln serve not ready")


def openai_latencies(url: str, key: str | None, model: str, n: int, max_tokens: int) -> list[float]:
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    out = []
    with httpx.Client(timeout=120) as client:
        for i in range(n):
            body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0}
            started = time.perf_counter()
            r = client.post(f"{url}/v1/completions", json=body, headers=headers)
            out.append(time.perf_counter() - started)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
    return out


def grpc_latencies(address: str, model: str, n: int, max_tokens: int) -> list[float]:
    """One request at a time over Triton's gRPC stream (what the gateway itself does), no gateway."""
    import queue

    import tritonclient.grpc as grpcclient

    from pipeline.serving.grpc_inputs import streaming_request

    done: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(address)
    client.start_stream(callback=lambda result, error: done.put((result, error)))
    out = []
    try:
        for i in range(n):
            started = time.perf_counter()
            client.async_stream_infer(model, streaming_request(PROMPTS[i % len(PROMPTS)], max_tokens))
            while True:
                result, error = done.get(timeout=120)
                if error is not None:
                    raise RuntimeError(str(error))
                if result.as_numpy("finish_reason") is not None:
                    break
            out.append(time.perf_counter() - started)
    finally:
        client.stop_stream()
        client.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15)
    args = parser.parse_args()
    from pipeline.serving.tenants import KeysDoc, TenantConfig, new_key, write_keys_file

    model = next(p.name for p in (args.package / "model_repository").iterdir() if (p / "config.pbtxt").is_file())
    console = Console()
    with tempfile.TemporaryDirectory(prefix="kiln-gw-bench-") as tmp:
        tmp = Path(tmp)
        doc = KeysDoc(tenants={"bench": TenantConfig(models=["*"], priority="standard", requests_per_minute=1_000_000,
                                                     tokens_per_minute=100_000_000)})
        _, key = new_key(doc, "bench")
        write_keys_file(tmp / "keys.yaml", doc)
        configs = {"plain": ([], None), "keys": (["--keys", str(tmp / "keys.yaml"), "--request-log", str(tmp / "requests.jsonl")], key),
                   "traced": (["--otlp-endpoint", discarding_collector()], None)}
        servers = {}
        try:
            for i, (name, (options, _)) in enumerate(configs.items()):
                servers[name] = start(args.package, 19000 + 10 * i, options, tmp / f"artifacts-{name}")
            lat = {(n, path, m): [] for n in configs for path in ("openai", "grpc") for m in args.max_tokens}
            for _ in range(args.rounds):
                for m in args.max_tokens:
                    for name, (_, key_) in configs.items():
                        _, url, grpc = servers[name]
                        lat[name, "openai", m] += openai_latencies(url, key_, model, args.requests, m)
                        lat[name, "grpc", m] += grpc_latencies(grpc, model, args.requests, m)
            loads = {name: ([], 0.0) for name in configs}
            for _ in range(args.rounds):  # alternating, like the latencies: no server always measured first
                for name, (_, key_) in configs.items():
                    url = servers[name][1]
                    headers = {"Authorization": f"Bearer {key_}"} if key_ else None
                    results, wall = asyncio.run(closed_loops(f"{url}/v1", model, args.clients, args.seconds, 32, PROMPTS, headers))
                    loads[name] = (loads[name][0] + results, loads[name][1] + wall)
            loads = {name: summary(results, wall) for name, (results, wall) in loads.items()}
        finally:
            for proc, _, _ in servers.values():
                stop(proc)

    table = Table(title=f"{model}: per-request latency, {args.requests} × {args.rounds} sequential requests per cell (ms)")
    for column in ("server", "max_tokens", "OpenAI p50", "OpenAI p95", "Triton gRPC p50", "gateway adds (p50)", "OpenAI p50 / plain"):
        table.add_column(column, justify="right")
    for m in args.max_tokens:
        plain = np.percentile(lat["plain", "openai", m], 50)
        for name in configs:
            o, g = lat[name, "openai", m], lat[name, "grpc", m]
            table.add_row(name, str(m), f"{np.percentile(o, 50) * 1e3:.2f}", f"{np.percentile(o, 95) * 1e3:.2f}",
                          f"{np.percentile(g, 50) * 1e3:.2f}", f"{(np.percentile(o, 50) - np.percentile(g, 50)) * 1e3:+.2f}",
                          f"{np.percentile(o, 50) / plain:.3f}")
    console.print(table)
    load = Table(title=f"{args.clients} streaming clients, {args.rounds} × {args.seconds:g} s each (max_tokens 32)")
    for column in ("server", "requests", "tokens/s", "TTFT p50 ms", "TTFT p95 ms", "errors", "tokens/s / plain"):
        load.add_column(column, justify="right")
    for name, s in loads.items():
        load.add_row(name, str(s["requests"]), f"{s['tokens_per_s']:.1f}", f"{s['ttft_p50']:.0f}", f"{s['ttft_p95']:.0f}", str(s["errors"]),
                     f"{s['tokens_per_s'] / loads['plain']['tokens_per_s']:.3f}")
    console.print(load)


if __name__ == "__main__":
    main()
