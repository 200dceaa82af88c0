"""Where the served time goes: a sampling profile of the Triton model's worker thread under load.

    .venv/bin/pip install py-spy          # a profiler, not a Kiln dependency
    .venv/bin/python benchmarks/serve_profile.py artifacts/cache/package/<key> [--clients 8] [--seconds 20]

Starts Triton on the package (as serve_load.py does), warms up, then records the model's Python
backend stub with py-spy (200 Hz) while `--clients` streaming clients run, and prints the share of
the worker thread's samples spent in each function (on its stack) and the clients' tokens/s.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import run_clients, tokens_per_s  # noqa: E402

from pipeline.serving.commands import local_repository  # noqa: E402
from pipeline.serving.environment import ensure_environment  # noqa: E402
from pipeline.serving.server import triton_server  # noqa: E402


def shares(raw: Path, thread: str = "(run)") -> tuple[int, collections.Counter]:
    """Samples of the worker thread, and per function the samples with it on the stack."""
    total, on_stack = 0, collections.Counter()
    for line in raw.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        if thread not in frames[0]:
            continue
        total += int(count)
        for name in {f.split(" (")[0] for f in frames[1:]}:
            on_stack[name] += int(count)
    return total, on_stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    repository = local_repository(args.package)
    model = next(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())
    spy = Path(sys.executable).with_name("py-spy")
    with tempfile.TemporaryDirectory() as tmp, triton_server(repository, ensure_environment(), Path(tmp) / "server.log") as (proc, a):
        run_clients(a.grpc, model, 1, args.max_tokens, requests=2)  # warm-up
        stub = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "triton_python_backend_stub"], capture_output=True, text=True).stdout.split()[0]
        raw = Path(tmp) / "profile.txt"
        recorder = subprocess.Popen([str(spy), "record", "-p", stub, "-d", str(int(args.seconds)), "-r", "200", "-f", "raw",
                                     "-o", str(raw), "--threads", "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        results, wall = run_clients(a.grpc, model, args.clients, args.max_tokens, seconds=args.seconds + 2)
        recorder.wait()
        total, on_stack = shares(raw)
    print(f"{args.clients} clients: {tokens_per_s(results, wall):.1f} tokens/s; worker thread samples: {total}")
    for name, count in on_stack.most_common(15):
        print(f"{count / total * 100:6.1f} %  {name}")


if __name__ == "__main__":
    main()
