"""Decode speed of the built engine vs the PyTorch fp32 source, side by side in one run.

    .venv/bin/python benchmarks/engine_vs_source.py recipes/smollm2-135m-int4-cpu.yaml --rounds 5

Builds (or reuses) the recipe's stages up to `build`, then alternates source and engine
measurements, each in a fresh process (so peak RSS is the model's own), and prints medians and
the engine/source ratio. Alternating keeps machine noise from favouring one side.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.cli import make_run_context, quiet_libraries
from pipeline.corpus import eval_token_ids
from pipeline.latency import measure_in_subprocess
from pipeline.modeling.hf import load_tokenizer
from pipeline.plan import run_stages
from pipeline.recipe import load_recipe

METRICS = (("tokens_per_s", "decode tokens/s", "higher"), ("ttft_ms", "time to first token (ms)", "lower"),
           ("decode_p50_ms", "per-token p50 (ms)", "lower"), ("decode_p95_ms", "per-token p95 (ms)", "lower"),
           ("peak_rss_mb", "peak RSS (MB)", "lower"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    args = parser.parse_args()

    console = Console()
    recipe = load_recipe(args.recipe)
    ctx = make_run_context(None, console)
    quiet_libraries()
    done = run_stages(recipe, ctx, ("source", "quantize", "export", "build"), console.print, Path.cwd())
    source, engine = done["source"], done["build"]

    ids = eval_token_ids(load_tokenizer(engine.path), recipe.validation)[0][1]  # the latency prompt, as validate takes it
    common = {"prompt_ids": ids[: args.prompt_tokens], "new_tokens": args.new_tokens, "warmup": 1, "repeats": 1,
              "threads": engine.meta["session_options"]["threads"]}
    sides = {
        "source": {**common, "backend": "torch", "model_dir": str(source.model_dir)},
        "engine": {**common, "backend": "engine", "target": engine.target, "engine_dir": str(engine.path),
                   "engine_meta": dict(engine.meta)},
    }
    results: dict[str, list[dict]] = {"source": [], "engine": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for side, spec in sides.items():
                results[side].append(measure_in_subprocess(spec, Path(tmp), side))
            console.print(f"round {r + 1}/{args.rounds}: source {results['source'][-1]['tokens_per_s']:.1f} tok/s, "
                          f"engine {results['engine'][-1]['tokens_per_s']:.1f} tok/s")

    table = Table(title=f"{recipe.name}: {args.rounds} alternating rounds, batch 1, {args.prompt_tokens}-token prompt, "
                        f"{args.new_tokens} new tokens (medians)")
    for col in ("metric", "source (PyTorch fp32)", f"engine ({engine.target})", "engine / source"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    for key, label, _better in METRICS:
        src = statistics.median(x[key] for x in results["source"])
        eng = statistics.median(x[key] for x in results["engine"])
        table.add_row(label, f"{src:.2f}", f"{eng:.2f}", f"{eng / src:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
