"""What zero points cost at decode time: the recipe built twice, with asymmetric and with symmetric
int4 codes (everything else equal), and the two engines' decode steps timed alternately in one
process.

    .venv/bin/python benchmarks/zero_point_cost.py recipes/smollm2-135m-gptq-int4-cpu-fast.yaml \
        --set quantize.method=rtn --set quantize.backend=auto

Symmetric codes change the weights (and their accuracy: see docs/gpu.md for SmolLM2), so this
measures a recipe choice, not a free speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from pipeline.cli import make_run_context, quiet_libraries
from pipeline.modeling.runtime import greedy_decode
from pipeline.plan import run_stages
from pipeline.recipe import load_recipe
from pipeline.targets import get_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    console = Console()
    quiet_libraries()
    ctx = make_run_context(None, console)
    lms = {}
    for symmetric in (False, True):
        recipe = load_recipe(args.recipe, [*args.overrides, f"quantize.symmetric={str(symmetric).lower()}"])
        engine = run_stages(recipe, ctx, ("source", "quantize", "export", "build"), console.print, Path.cwd())["build"]
        lms["symmetric" if symmetric else "asymmetric"] = get_target(engine.target).load(engine.path, dict(engine.meta))
    prompt = np.arange(1000, 1064, dtype=np.int64)
    step_ms: dict[str, list[float]] = {name: [] for name in lms}
    for _ in range(args.rounds):
        for name, lm in lms.items():
            _, _, steps = greedy_decode(lm, prompt, args.new_tokens, time.perf_counter)
            step_ms[name].append(statistics.median(steps) * 1e3)
    for name, values in step_ms.items():
        console.print(f"{name}: decode step p50 by round (ms) {', '.join(f'{v:.2f}' for v in values)}; median {statistics.median(values):.2f}")
    ratios = [a / s for a, s in zip(step_ms["asymmetric"], step_ms["symmetric"])]
    console.print(f"asymmetric ÷ symmetric step time: median {statistics.median(ratios):.3f} "
                  f"(by round {', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
