"""Prompt processing (prefill) speed, engine alone: time to the first token of prompts of 64, 512
and 2,040 tokens (random ids; a 2,048-position engine leaves room for 8 more), and prefill tokens/s.

    .venv/bin/python benchmarks/prefill.py artifacts/cache/build/<key> [artifacts/cache/build/<key> ...] [--rounds 3]

Every engine folder is measured as it serves prompts (`runtime.prompt_forward`: a fresh KV state,
logits at the last position only where the engine can, its prefill session where it has one) and,
for an engine with a separate prefill kernel, once more with its decode kernel for prompts too,
so the kernel's share shows. Engines alternate within each round, in one process; the best round
counts. Ratios are to the first column measured.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline.artifacts import read_manifest
from pipeline.modeling.runtime import prompt_forward
from pipeline.targets import get_target

LENGTHS = (64, 512, 2040)


def ttft_ms(lm, prompt: np.ndarray) -> float:
    started = time.perf_counter()
    logits, _ = prompt_forward(lm, prompt[None, :])
    int(logits[0, -1].argmax())
    return (time.perf_counter() - started) * 1e3


def engines_of(folders: list[Path]) -> list[tuple[str, object]]:
    engines = []
    for folder in folders:
        meta = read_manifest(folder)["meta"]
        opts = meta.get("session_options", {})
        lm = get_target(meta["target"]).load(folder, meta)
        label = f"{folder.name[:8]} {opts.get('graph', '')} {opts.get('int4_compute', '')}"
        if getattr(lm, "prefill_session", None) is not None:
            engines.append((f"{label}, prompts {opts.get('prefill_int4_compute')}", lm))
            engines.append((f"{label}, prompts {opts.get('int4_compute')} (decode kernel)", lm.without_prefill()))
        else:
            engines.append((label + ("" if getattr(lm, "selects_logits", True) else ", logits at every position"), lm))
    return engines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engines", type=Path, nargs="+", help="build stage folders")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    args = parser.parse_args()
    engines = engines_of(args.engines)
    rng = np.random.default_rng(0)
    prompts = {n: rng.integers(100, 20000, size=n).astype(np.int64) for n in args.lengths}
    for _, lm in engines:  # warm-up: first runs allocate and prepack
        ttft_ms(lm, prompts[min(args.lengths)])
    best: dict[tuple[str, int], float] = {}
    for _ in range(args.rounds):
        for name, lm in engines:
            for n, prompt in prompts.items():
                ms = ttft_ms(lm, prompt)
                best[name, n] = min(ms, best.get((name, n), ms))
    table = Table(title="Time to first token, engine alone (best of rounds)")
    table.add_column("engine")
    for n in args.lengths:
        table.add_column(f"{n} tok: ms", justify="right")
        table.add_column("tok/s", justify="right")
        table.add_column(f"vs {engines[0][0][:8]}", justify="right")
    for name, _ in engines:
        cells = []
        for n in args.lengths:
            ms = best[name, n]
            cells += [f"{ms:.0f}", f"{n / ms * 1e3:.0f}", f"{best[engines[0][0], n] / ms:.2f}x"]
        table.add_row(name, *cells)
    Console().print(table)


if __name__ == "__main__":
    main()
