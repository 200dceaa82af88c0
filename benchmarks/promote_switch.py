"""Promotion and rollback under load: what clients of `kiln serve models:/NAME` see while the
registry's @production alias moves (issue 24).

    .venv/bin/python benchmarks/promote_switch.py [--recipe recipes/smollm2-135m-int4-cpu.yaml] \
        [--clients 8] [--max-tokens 32] [--watch-interval 5] [--standby 20]

In a scratch artifacts root (the stage cache hard-linked from artifacts/cache, so a built recipe is
not rebuilt) the recipe is registered twice (the second with `package.max_queue=31`, so the
versions differ), version 1 promoted to @production and version 2 to @staging. `kiln serve
models:/NAME` serves both while N closed-loop clients stream `/v1/completions` for bare NAME
(serve_openai.py's client). Then, timed by this script:
  1. promote 2 → production (version 2 is already loaded as @staging: no load);
  2. rollback while version 1 is still a warm standby (no load);
  3. promote 2 again, wait until version 1 is unloaded (its standby over), rollback: a cold load.
Per switch: the `kiln promote`/`rollback` command's own time, then from its return to the first
token served by the new version; failed or truncated requests; TTFT p95 before the first switch and
in the 10 s after each switch's command.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from serve_openai import PROMPTS, stop, stream_completion, wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KILN = str(Path(sys.executable).parent / "kiln")


def kiln(*args: str, env: dict) -> float:
    started = time.monotonic()
    proc = subprocess.run([KILN, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"kiln {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return time.monotonic() - started


def load_in_thread(url: str, model: str, clients: int, max_tokens: int, stop_event: threading.Event) -> tuple[list, threading.Thread]:
    import httpx

    results: list[dict] = []

    async def run():
        limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
        async with httpx.AsyncClient(limits=limits) as client:
            async def loop(k):
                i = k
                while not stop_event.is_set():
                    results.append(await stream_completion(client, url, model, PROMPTS[i % len(PROMPTS)], max_tokens))
                    i += clients

            await asyncio.gather(*(loop(k) for k in range(clients)))

    thread = threading.Thread(target=lambda: asyncio.run(run()), daemon=True)
    thread.start()
    return results, thread


def first_served(results: list[dict], version: str, after: float) -> float | None:
    """perf_counter time of the first token that `version` produced for a request started after `after`."""
    times = [r["first"] for r in list(results) if r["first"] and r["start"] > after and (r["model"] or "").endswith(f"/{version}")]
    return min(times) if times else None


def wait_first(results: list[dict], version: str, after: float, timeout: float = 120) -> float:
    deadline = time.monotonic() + timeout
    while (t := first_served(results, version, after)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no request served by version {version} within {timeout} s")
        time.sleep(0.05)
    return t


def p95(results: list[dict], start: float, end: float) -> float:
    ttft = [(r["first"] - r["start"]) * 1e3 for r in results if r["first"] and start <= r["start"] < end]
    return float(np.percentile(ttft, 95)) if ttft else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "smollm2-135m-int4-cpu.yaml")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--watch-interval", type=float, default=5.0)
    parser.add_argument("--standby", type=float, default=20.0)
    args = parser.parse_args()
    console = Console(width=140)
    scratch = Path(tempfile.mkdtemp(prefix="kiln-promote-bench-"))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"KILN_ARTIFACTS": str(scratch)}
    if (ROOT / "artifacts" / "cache").is_dir():
        shutil.copytree(ROOT / "artifacts" / "cache", scratch / "cache", copy_function=os.link)
    import yaml

    name = yaml.safe_load(args.recipe.read_text())["register"]["model_name"]
    kiln("run", str(args.recipe), env=env)
    kiln("run", str(args.recipe), "--set", "package.max_queue=31", env=env)
    for version, alias in (("1", "staging"), ("1", "production"), ("2", "staging")):
        kiln("promote", name, version, "--to", alias, env=env)
    server = subprocess.Popen([KILN, "serve", f"models:/{name}", "--http-port", "18100", "--grpc-port", "18101", "--metrics-port", "18102",
                               "--openai-port", "18103", "--watch-interval", str(args.watch_interval), "--standby", str(args.standby)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True).start()
    url = "http://127.0.0.1:18103/v1"
    rows, stop_event = [], threading.Event()
    try:
        wait_for(url, server)
        results, thread = load_in_thread(url, name, args.clients, args.max_tokens, stop_event)
        t0 = time.perf_counter()
        time.sleep(15)
        events = [("promote 2 → production (2 loaded as @staging)", ("promote", name, "2", "--to", "production"), "2"),
                  ("rollback (1 a warm standby)", ("rollback", name), "1"),
                  ("promote 2 → production again", ("promote", name, "2", "--to", "production"), "2"),
                  ("rollback after 1 was unloaded (cold load)", ("rollback", name), "1")]
        for i, (what, command, version) in enumerate(events):
            if i == 3:  # the standby must be over: wait for the unload line
                deadline = time.monotonic() + args.standby + 60
                while sum("version 1: unloading" in line for line in lines) < 1:
                    if time.monotonic() > deadline:
                        raise RuntimeError("version 1 was not unloaded")
                    time.sleep(0.2)
                time.sleep(2)
            start = time.perf_counter()
            command_s = kiln(*command, env=env)
            returned = time.perf_counter()
            first = wait_first(results, version, returned)
            rows.append((what, command_s, first - returned, start))
            time.sleep(12)
        end = time.perf_counter()
        stop_event.set()
        thread.join(120)
    finally:
        stop(server)
        shutil.rmtree(scratch, ignore_errors=True)
    # a finish reason is the end of a whole answer (some prompts get end-of-sequence first: 0 tokens, "stop")
    failed = [r for r in results if r["error"] or r["finish"] not in ("stop", "length")]
    table = Table(title=f"{name}: {args.clients} clients streaming bare NAME, max_tokens {args.max_tokens}, watch interval "
                        f"{args.watch_interval:g} s, standby {args.standby:g} s")
    for column in ("switch", "command (s)", "its return → first token of the new version (s)", "TTFT p95 in the next 10 s (ms)"):
        table.add_column(column)
    table.add_row("before any switch", "", "", f"{p95(results, t0, rows[0][3]):.0f}")
    for what, command_s, reached, start in rows:
        table.add_row(what, f"{command_s:.1f}", f"{reached:.2f}", f"{p95(results, start, start + 10):.0f}")
    console.print(table)
    console.print(f"requests: {len(results)}, failed or truncated: {len(failed)}"
                  + (f" (first: {failed[0]['error']})" if failed else "") + f"; sitting {end - t0:.0f} s")
    print("".join(line for line in lines if "version" in line and ("loaded" in line or "now" in line or "unloading" in line)))


if __name__ == "__main__":
    main()
