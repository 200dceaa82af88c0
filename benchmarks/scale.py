"""Memory, disk and time per stage for random-weight Llama models of real shapes (issue 14).

    .venv/bin/python benchmarks/scale.py --shapes 135m            # SmolLM2's shapes, vocab 49152
    .venv/bin/python benchmarks/scale.py --shapes 135m 1b 3b --vocab 49152 128256

Each shape runs the tiny recipe's stages (RTN int4 g32, onnxruntime-cpu fused graph, validation,
package, registration into a temporary store) on a `random_model` source of that shape, and prints
per stage the wall time, peak RSS (the stage's own, and its children's) and disk written, read
from the stage manifests the runner writes, plus the engine's tokens/s and TTFT. A shape whose
run fails (e.g. killed for memory) is reported with the stage it reached.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.artifacts import read_manifest
from pipeline.cli import make_run_context, quiet_libraries
from pipeline.errors import KilnError
from pipeline.plan import run_stages
from pipeline.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny-llama-int4-cpu.yaml"
STAGES = ("source", "quantize", "export", "build", "validate", "package", "register")
# Llama-family shapes: (hidden, intermediate, layers, heads, kv heads)
SHAPES = {"135m": (576, 1536, 30, 9, 3), "1b": (2048, 8192, 16, 32, 8), "3b": (3072, 8192, 28, 24, 8)}


def overrides(shape: str, vocab: int) -> list[str]:
    hidden, inter, layers, heads, kv = SHAPES[shape]
    model = (f"{{family: llama, hidden_size: {hidden}, intermediate_size: {inter}, num_hidden_layers: {layers}, "
             f"num_attention_heads: {heads}, num_key_value_heads: {kv}, max_position_embeddings: 2048, "
             f"config: {{vocab_size: {vocab}, rope_parameters: {{rope_type: default, rope_theta: 10000.0}}}}}}")
    return [f"source.random_model={model}", f"register.model_name=scale-{shape}-{vocab}", "validate.on_gate_failure=warn",
            "build.max_sequence_length=512", "validate.max_eval_tokens=1024", "validate.window=256",
            "validate.latency={prompt_tokens: 64, new_tokens: 32, warmup: 1, repeats: 2}"]


def run_shape(shape: str, vocab: int, root: Path, console: Console) -> tuple[list[dict], dict | None, str | None]:
    recipe = load_recipe(TINY, overrides(shape, vocab))
    ctx = make_run_context(root, console)
    error = None
    try:
        run_stages(recipe, ctx, STAGES, console.print, ROOT)
    except KilnError as e:
        error = str(e)[:300]
    rows, metrics = [], None
    for stage in STAGES:  # whatever was built, in order
        entries = sorted((root / "cache" / stage).glob("[0-9a-f]*"), key=lambda p: p.stat().st_mtime)
        if not entries:
            break
        manifest = read_manifest(entries[-1])
        rows.append({"stage": stage, "seconds": manifest["seconds"], **manifest.get("resources", {})})
        if stage == "validate":
            metrics = manifest["meta"]["metrics"]
    return rows, metrics, error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["135m"], choices=list(SHAPES))
    parser.add_argument("--vocab", nargs="+", type=int, default=[49152])
    args = parser.parse_args()
    quiet_libraries()
    console = Console(stderr=True)
    out = Console(width=200)
    for shape in args.shapes:
        for vocab in args.vocab:
            with tempfile.TemporaryDirectory(dir=ROOT / "artifacts") as tmp:
                t0 = time.perf_counter()
                rows, metrics, error = run_shape(shape, vocab, Path(tmp), console)
                table = Table(title=f"Llama {shape} shapes, vocab {vocab}, RTN int4 g32, onnxruntime-cpu "
                                    f"({time.perf_counter() - t0:.0f} s{'; FAILED: ' + error if error else ''})")
                for column in ("stage", "seconds", "peak RSS MB", "children peak RSS MB", "disk written MB", "disk linked MB"):
                    table.add_column(column, justify="right")
                for r in rows:
                    table.add_row(r["stage"], f"{r['seconds']:.1f}", *(f"{r[k]:,.0f}" if r.get(k) is not None else "-"
                                  for k in ("peak_rss_mb", "children_peak_rss_mb", "disk_written_mb", "disk_linked_mb")))
                out.print(table)
                if metrics:
                    out.print(json.dumps({k: round(metrics[k], 2) for k in ("tokens_per_s", "ttft_ms", "peak_rss_mb", "ppl_increase_pct")}))


if __name__ == "__main__":
    main()
