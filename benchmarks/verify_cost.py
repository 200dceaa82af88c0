"""Speculative decoding's cost curve (issue 27's first measurement), engine alone: the time of one
forward that takes k new tokens after a past of P positions, with logits at all k positions (what
verifying k-1 drafted tokens needs), for k = 1..8, on each kernel the engine has.

    .venv/bin/python benchmarks/verify_cost.py artifacts/cache/build/<key> [--past 128 512] [--repeats 30]

After each timed forward the row's length is set back to P: the KV positions written past it are
simply overwritten next time (GroupQueryAttention reads a row only up to its length), which is the
rollback a rejected draft needs. Ratios are to k = 1 on the same kernel; a ratio r at k tokens means
speculation pays when more than r - 1 of the k - 1 drafted tokens are accepted on average.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline.artifacts import read_manifest
from pipeline.modeling.runtime import prompt_forward
from pipeline.targets import get_target


def step_ms(lm, state, past: int, k: int, kernel: str, repeats: int, rng) -> float:
    times = []
    for _ in range(repeats):
        tokens = rng.integers(100, 20000, size=(1, k)).astype(np.int64)
        started = time.perf_counter()
        logits, _ = lm.forward(tokens, state, kernel=kernel)
        int(logits[0, -1].argmax())
        times.append((time.perf_counter() - started) * 1e3)
        state.cache["row_lengths"] = np.array([past], dtype=np.int32)  # roll back: the next forward overwrites
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine", type=Path, help="a build stage folder (fused ONNX Runtime graph)")
    parser.add_argument("--past", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--max-k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    console = Console(width=160)
    meta = read_manifest(args.engine)["meta"]
    lm = get_target(meta["target"]).load(args.engine, meta)
    if not hasattr(lm, "row_view"):
        raise SystemExit(f"{args.engine}: not a fused ONNX Runtime engine (the only kind this benchmark rolls back)")
    kernels = ["decode"] + (["prefill"] if getattr(lm, "prefill_session", None) is not None else [])
    opts = meta.get("session_options", {})
    rng = np.random.default_rng(0)
    table = Table(title=f"{args.engine.name[:12]}: {opts.get('int4_compute')} decode kernel"
                        + (f", {opts.get('prefill_int4_compute')} prompt kernel" if len(kernels) > 1 else "")
                        + f"; median of {args.repeats}")
    table.add_column("past")
    table.add_column("kernel")
    for k in range(1, args.max_k + 1):
        table.add_column(f"k={k} ms (×k=1)", justify="right")
    for past in args.past:
        for kernel in kernels:
            _, state = prompt_forward(lm, rng.integers(100, 20000, size=(1, past)).astype(np.int64))
            step_ms(lm, state, past, 1, kernel, 3, rng)  # warm-up
            row = [step_ms(lm, state, past, k, kernel, args.repeats, rng) for k in range(1, args.max_k + 1)]
            table.add_row(str(past), kernel, *(f"{ms:.2f} ({ms / row[0]:.2f})" for ms in row))
    console.print(table)


if __name__ == "__main__":
    main()
