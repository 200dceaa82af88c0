"""Decode step time by live rows, engine alone (no server): how well an engine batches rows.

    .venv/bin/python benchmarks/batch_rows.py artifacts/cache/build/<key> [artifacts/cache/build/<key> ...] [--past 32 480]

For each engine folder and 1, 2, 4, 8, 16, 32 rows: a prefill of `--past` tokens per row (32 unless
told), then the median of 40 one-token decode steps. Engines are measured in turn, twice (the
faster round counts), in one process, and the table gives each row count's tokens/s and its ratio
to the same engine at one row. Several `--past` lengths show what the rows' context costs: every
step reads each row's keys and values (attention), which the matmuls' cost does not depend on.
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

ROWS = (1, 2, 4, 8, 16, 32)


def step_ms(lm, rows: int, past: int, steps: int = 40) -> float:
    # logits at the last position only where the engine can (32 rows × 480 positions of full logits are 3 GB)
    _, state = prompt_forward(lm, np.full((rows, past), 100, dtype=np.int64))
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        _, state = lm.forward(np.full((rows, 1), 5, dtype=np.int64), state)
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engines", type=Path, nargs="+", help="build stage folders")
    parser.add_argument("--past", type=int, nargs="+", default=[32], help="prompt tokens per row before the timed steps")
    args = parser.parse_args()
    engines = []
    for folder in args.engines:
        meta = read_manifest(folder)["meta"]
        name = f"{folder.name[:8]} ({meta['target']}, {meta.get('session_options', {}).get('int4_compute', '-')} activations)"
        engines.append((name, get_target(meta["target"]).load(folder, meta)))
    best: dict[tuple[str, int, int], float] = {}
    for _ in range(2):
        for name, lm in engines:
            for past in args.past:
                for rows in ROWS:
                    ms = step_ms(lm, rows, past)
                    best[name, past, rows] = min(ms, best.get((name, past, rows), ms))
    for past in args.past:
        table = Table(title=f"decode step by live rows after {past} tokens each: step ms / tokens/s / × one row's tokens/s")
        table.add_column("engine")
        for rows in ROWS:
            table.add_column(f"{rows} row{'s' if rows > 1 else ''}", justify="right")
        for name, _ in engines:
            one = best[name, past, 1]
            table.add_row(name, *(f"{best[name, past, r]:.2f} / {r / best[name, past, r] * 1e3:.0f} / {r * one / best[name, past, r]:.2f}×"
                                  for r in ROWS))
        Console().print(table)


if __name__ == "__main__":
    main()
