"""Load on the Triton runtime: N concurrent streaming gRPC clients, a fixed number of requests.

    .venv/bin/python benchmarks/serve_load.py artifacts/cache/package/<key> --clients 8 --requests 64 --max-tokens 32

Starts Triton on the package (as `kiln serve` does), then each client sends requests one after
another over its own gRPC stream. Prints requests/s, streamed pieces/s, time to first piece and the
gaps between pieces (p50/p95), and the error count; exits 1 if any request failed. A piece is one
streamed response: one token's text, or several when a token completes a multi-byte character.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline.serving.commands import local_repository
from pipeline.serving.environment import ensure_environment
from pipeline.serving.grpc_inputs import streaming_request
from pipeline.serving.server import triton_server

PROMPTS = ["What is Python?", "Explain a for loop.", "Write a haiku about compilers.", "List three sorting algorithms.",
           "What does a tokenizer do?", "Describe the KV cache.", "Why quantize a model?", "Say hello."]


def client_loop(address: str, model: str, jobs: list[tuple[str, int]], results: list, lock: threading.Lock) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(address)
    for prompt, max_tokens in jobs:
        times, done, failures = [], threading.Event(), []

        def callback(result, error, times=times, done=done, failures=failures):
            now = time.perf_counter()
            if error is not None:
                failures.append(str(error))
                done.set()
                return
            response = result.get_response()
            if response.outputs:
                times.append(now)
            final = response.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                done.set()

        inputs = streaming_request(prompt, max_tokens)
        client.start_stream(callback=callback)
        start = time.perf_counter()
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        ok = done.wait(120)
        client.stop_stream()
        with lock:
            results.append({"start": start, "times": times, "error": failures[0] if failures else (None if ok else "timeout")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path, help="a package stage folder or a model repository")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    console = Console()
    repository = local_repository(args.package)
    model = next(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())
    jobs = [(PROMPTS[i % len(PROMPTS)], args.max_tokens) for i in range(args.requests)]
    results: list[dict] = []
    lock = threading.Lock()
    with tempfile.TemporaryDirectory() as tmp, triton_server(repository, ensure_environment(log=console.print), Path(tmp) / "server.log") as (_, a):
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client_loop, args=(a.grpc, model, jobs[i :: args.clients], results, lock))
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0

    errors = [r["error"] for r in results if r["error"]]
    good = [r for r in results if not r["error"] and r["times"]]
    ttft = [(r["times"][0] - r["start"]) * 1e3 for r in good]
    gaps = [g * 1e3 for r in good for g in np.diff(r["times"])]
    pieces = sum(len(r["times"]) for r in good)
    table = Table(title=f"{model}: {args.clients} concurrent streaming clients, {args.requests} requests, max_tokens {args.max_tokens}")
    for col in ("requests/s", "pieces/s", "TTFT p50 (ms)", "TTFT p95 (ms)", "gap p50 (ms)", "gap p95 (ms)", "errors"):
        table.add_column(col, justify="right")
    pct = lambda xs, q: f"{float(np.percentile(xs, q)):.1f}" if xs else "-"  # noqa: E731
    table.add_row(f"{len(good) / wall:.2f}", f"{pieces / wall:.1f}", pct(ttft, 50), pct(ttft, 95), pct(gaps, 50), pct(gaps, 95), str(len(errors)))
    console.print(table)
    if errors:
        console.print(f"[red]{len(errors)} failed[/red]: {statistics.mode(errors)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
