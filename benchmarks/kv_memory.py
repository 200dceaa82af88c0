"""Serving memory at many live rows, engine alone: the process's resident memory while `--rows`
requests with prompts of `--prompt-tokens` tokens decode together through the scheduler the
Triton model runs (greedy; random prompt ids).

    .venv/bin/python benchmarks/kv_memory.py artifacts/cache/build/<key> [--rows 32] [--prompt-tokens 100]

Prints RSS after the engine loaded, after every row is prefilled and has decoded `--steps` tokens
(the batch live), and the peak, in MB. To compare with an earlier version of the decode loop, run
the same script with PYTHONPATH pointing at a checkout of that version (`git worktree add`); the
script drives `pipeline.engine.Scheduler`, or `pipeline.serving.generation.InflightBatch` where the
checkout predates it.
"""

from __future__ import annotations

import argparse
import resource
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class NoText:
    def decode(self, ids, skip_special_tokens=True):
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine", type=Path, help="a build stage folder")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    from pipeline.artifacts import read_manifest
    from pipeline.targets import get_target

    meta = read_manifest(args.engine)["meta"]
    lm = get_target(meta["target"]).load(args.engine, meta)
    try:  # a checkout before issue 23 first (an editable install would find the newer package for it)
        from pipeline.serving.generation import GenerationRequest
        from pipeline.serving.generation import InflightBatch as Batch
    except ImportError:
        from pipeline.engine import GenerationRequest
        from pipeline.engine import Scheduler as Batch
    loaded = rss_mb()
    rng = np.random.default_rng(0)
    running = Batch(lm, NoText(), set(), args.rows)
    requests = [GenerationRequest(tuple(int(t) for t in rng.integers(100, 20000, size=args.prompt_tokens)), args.steps + 100)
                for _ in range(args.rows)]
    running.admit_many([(r, lambda d, f: None) for r in requests])
    while any(row is not None and len(row.seq.ids) < args.steps for row in running.rows):
        running.step()
    live = rss_mb()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{Batch.__name__}: {args.rows} rows of {args.prompt_tokens} prompt tokens + {args.steps} generated: "
          f"RSS loaded {loaded:.0f} MB, live {live:.0f} MB (+{live - loaded:.0f}), peak {peak:.0f} MB")


if __name__ == "__main__":
    main()
