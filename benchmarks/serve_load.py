"""Load on the Triton runtime, in one sitting against one server: issue 15's goals, measured.

    .venv/bin/python benchmarks/serve_load.py artifacts/cache/package/<key> [--max-tokens 32] [--seconds 60]

Starts Triton on the package (as `kiln serve` does); every client is an independent tritonclient
gRPC streaming client. Phases, all in this sitting:
  1. one client, requests one after another: the single-client TTFT, tokens/s and decode step;
  2. 8 concurrent clients: TTFT p50 vs single, generated tokens/s vs single;
  3. 32 concurrent clients for --seconds: errors, incomplete streams, TTFT p95 vs single;
  4. a 512-token stream cancelled after its first piece, then one request: how much later its
     first token comes than the single-client TTFT, in decode steps.
A piece is one streamed response: one token's text (or several tokens completing a character),
so pieces/s is the generated-token rate to within multi-byte characters. Prints the absolute
figures, the ratios and whether each goal is met; exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
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

# Raw prompts (no chat template). Measured: SmolLM2-Instruct answers "Explain a for loop." with its
# end-of-sequence token at once, a request with no text to time, so it is not among them.
PROMPTS = ["What is Python?", "Say hello.", "Write a haiku about compilers.", "List three sorting algorithms.",
           "What does a tokenizer do?", "Describe the KV cache.", "Why quantize a model?", "The capital of France is"]


def stream_once(client, model: str, prompt: str, max_tokens: int, cancel_after_first: bool = False, timeout: float = 120) -> dict:
    """One streaming request on `client`'s own stream: arrival times of its pieces, and how it ended."""
    times, done, failures, first = [], threading.Event(), [], threading.Event()

    def callback(result, error):
        now = time.perf_counter()
        if error is not None:
            failures.append(str(error))
            done.set()
            return
        response = result.get_response()
        if response.outputs and result.as_numpy("finish_reason") is None:  # a text piece, not the final summary
            times.append(now)
            first.set()
        final = response.parameters.get("triton_final_response")
        if final is not None and final.bool_param:
            done.set()

    client.start_stream(callback=callback)
    start = time.perf_counter()
    client.async_stream_infer(model, streaming_request(prompt, max_tokens), enable_empty_final_response=True)
    if cancel_after_first:
        first.wait(timeout)
        client.stop_stream(cancel_requests=True)
        return {"start": start, "times": times, "error": None, "complete": False}
    ok = done.wait(timeout)
    client.stop_stream()
    return {"start": start, "times": times, "error": failures[0] if failures else (None if ok else "timeout"), "complete": ok and not failures}


def run_clients(address: str, model: str, clients: int, max_tokens: int, *, requests: int | None = None,
                seconds: float | None = None, prompts: list[str] = PROMPTS) -> tuple[list[dict], float]:
    """`clients` threads, each its own gRPC client sending one request after another, until
    `requests` in all were sent or `seconds` passed (then each finishes the request it has open)."""
    import tritonclient.grpc as grpcclient

    results, lock, counter = [], threading.Lock(), iter(range(10**9))
    t0 = time.perf_counter()

    def loop(k):
        client = grpcclient.InferenceServerClient(address)
        while True:
            i = next(counter)
            if (requests is not None and i >= requests) or (seconds is not None and time.perf_counter() - t0 > seconds):
                return
            r = stream_once(client, model, prompts[i % len(prompts)], max_tokens)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def ttfts(results) -> list[float]:
    return [(r["times"][0] - r["start"]) * 1e3 for r in results if r["times"]]


def tokens_per_s(results, wall: float) -> float:
    return sum(len(r["times"]) for r in results) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path, help="a package stage folder or a model repository")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the 32-client phase")
    args = parser.parse_args()

    import tritonclient.grpc as grpcclient

    console = Console()
    repository = local_repository(args.package)
    model = next(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())
    with tempfile.TemporaryDirectory() as tmp, triton_server(repository, ensure_environment(log=console.print), Path(tmp) / "server.log") as (_, a):
        run_clients(a.grpc, model, 1, args.max_tokens, requests=2)  # warm-up
        single, single_wall = run_clients(a.grpc, model, 1, args.max_tokens, requests=8)
        eight, eight_wall = run_clients(a.grpc, model, 8, args.max_tokens, requests=48)
        many, many_wall = run_clients(a.grpc, model, 32, args.max_tokens, seconds=args.seconds)
        client = grpcclient.InferenceServerClient(a.grpc)
        stream_once(client, model, PROMPTS[0], 512, cancel_after_first=True)
        after_cancel = stream_once(grpcclient.InferenceServerClient(a.grpc), model, PROMPTS[1], args.max_tokens)

    single_ttft = float(np.median(ttfts(single)))
    step_ms = float(np.median([g * 1e3 for r in single for g in np.diff(r["times"])]))
    single_tps = tokens_per_s(single, single_wall)
    errors = [r for r in eight + many + [after_cancel] if r["error"]]
    incomplete = [r for r in eight + many + [after_cancel] if not r["complete"]]
    delay_steps = ((after_cancel["times"][0] - after_cancel["start"]) * 1e3 - single_ttft) / step_ms if after_cancel["times"] else float("inf")

    figures = Table(title=f"{model}: streaming, max_tokens {args.max_tokens}, one sitting")
    for col in ("phase", "requests", "TTFT p50 ms", "TTFT p95 ms", "tokens/s", "errors", "incomplete"):
        figures.add_column(col, justify="right")
    for name, results, wall in (("1 client", single, single_wall), ("8 clients", eight, eight_wall),
                                (f"32 clients, {args.seconds:.0f} s", many, many_wall)):
        t = ttfts(results)
        figures.add_row(name, str(len(results)), f"{np.percentile(t, 50):.1f}", f"{np.percentile(t, 95):.1f}",
                        f"{tokens_per_s(results, wall):.1f}", str(sum(bool(r['error']) for r in results)),
                        str(sum(not r["complete"] for r in results)))
    console.print(figures)
    console.print(f"single client: decode step {step_ms:.2f} ms (median gap between pieces); request after a cancelled 512-token "
                  f"stream: TTFT {(after_cancel['times'][0] - after_cancel['start']) * 1e3 if after_cancel['times'] else float('nan'):.1f} ms")

    goals = Table(title="issue 15 goals")
    for col in ("goal", "measured", "limit", "met"):
        goals.add_column(col, justify="right")
    rows = [
        ("32 clients: errors + incomplete streams", len(errors) + len(incomplete), 0),
        ("32 clients: TTFT p95 / single TTFT", np.percentile(ttfts(many), 95) / single_ttft, 10.0),
        ("8 clients: TTFT p50 / single TTFT", np.percentile(ttfts(eight), 50) / single_ttft, 3.0),
        ("8 clients: tokens/s / single tokens/s (at least)", tokens_per_s(eight, eight_wall) / single_tps, 3.0),
        ("after a cancelled stream: extra TTFT in decode steps", delay_steps, 2.0),
    ]
    for name, value, limit in rows:
        met = value >= limit if "(at least)" in name else value <= limit
        goals.add_row(name, f"{value:.2f}", f"{limit:g}", "[green]yes[/green]" if met else "[red]no[/red]")
    console.print(goals)
    if errors:
        console.print(f"[red]{len(errors)} failed[/red]: {errors[0]['error']}")
        sys.exit(1)


if __name__ == "__main__":
    main()
