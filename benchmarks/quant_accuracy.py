"""Accuracy of RTN, GPTQ and AWQ int4 builds against the fp32 source, in one run.

    .venv/bin/python benchmarks/quant_accuracy.py recipes/smollm2-135m-gptq-int4-cpu.yaml
    .venv/bin/python benchmarks/quant_accuracy.py recipes/tiny-llama-int4-cpu.yaml --methods rtn gptq --groups 32

Each (method, group size) is a real `kiln run` of the recipe with overrides, in its own process,
all sharing one artifacts folder: the source is built once (first, alone), so every build's
quantize stage starts in a fresh process and its recorded peak RSS is quantization's own.
Perplexity and next-token agreement come from validation, through the built ONNX Runtime engine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.metric_table import per_text_rows


def kiln(recipe: Path, artifacts: Path, *overrides: str) -> dict:
    args = [sys.executable, "-m", "pipeline.cli", "run", str(recipe), "--artifacts", str(artifacts),
            "--set", "validate.on_gate_failure=warn", "--set", "validate.compare_source_speed=false",
            "--set", "quantize.backend=auto"]  # each method's default backend
    for o in overrides:
        args += ["--set", o]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"kiln run {' '.join(overrides)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    return json.loads((artifacts / "last_run.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq", "awq"])
    parser.add_argument("--groups", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--artifacts", type=Path, default=None, help="reuse a cache between invocations")
    args = parser.parse_args()
    console = Console(width=170)
    artifacts = args.artifacts or Path(tempfile.mkdtemp(prefix="kiln-quant-bench-"))

    console.print(f"building the source once ({artifacts})")
    kiln(args.recipe, artifacts, "quantize.method=none")
    rows = []
    for group in args.groups:
        for method in args.methods:
            console.print(f"building {method} g{group} ...")
            summary = kiln(args.recipe, artifacts, f"quantize.method={method}", f"quantize.group_size={group}")
            stages = {s["stage"]: s for s in summary["stages"]}
            quant = json.loads((Path(stages["quantize"]["path"]) / "manifest.json").read_text())
            rows.append((method, group, summary["metrics"], quant))

    first = rows[0][2]
    table = Table(title=f"{args.recipe.name}: int4 builds vs the fp32 source (perplexity {first['source_ppl']:.3f}), "
                        "all through the ONNX Runtime engine")
    texts = [row.key for row in per_text_rows(first) if row.key.endswith("/ppl_increase_pct")]  # each evaluation text's increase
    for col in ("method", "group", "perplexity", "increase", "next-token agreement", *(f"increase: {k.split('/')[1]}" for k in texts),
                "layer output error (mean)", "quantize time (s)", "quantize peak RSS (MB)"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for method, group, m, quant in rows:
        table.add_row(method, str(group), f"{m['engine_ppl']:.3f}", f"{m['ppl_increase_pct']:+.2f} %",
                      f"{m['next_token_agreement']:.3f}", *(f"{m[k]:+.2f} %" if k in m else "-" for k in texts),
                      f"{quant['meta']['mean_relative_output_error']:.4f}",
                      f"{quant['seconds']:.1f}", f"{quant['meta']['process_peak_rss_mb']:.0f}")
    console.print(table)
    console.print("perplexity, increase and agreement pool the evaluation texts other than the calibration text (what the gates see)")


if __name__ == "__main__":
    main()
