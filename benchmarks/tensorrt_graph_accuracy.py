"""Accuracy of the graphs Kiln hands TensorRT, measured without a GPU on ONNX Runtime CPU.

    .venv/bin/python benchmarks/tensorrt_graph_accuracy.py recipes/smollm2-135m-gptq-int4-tensorrt.yaml

Builds (or reuses) the recipe's source, quantize and export stages (they run on the CPU whatever
the target), writes the TensorRT input graphs (`modeling/tensorrt_graph`: zero points folded, fp32
and fp16) and scores them and the exported graph on the held-out text: perplexity, top-1 agreement
with the exported graph, and greedy tokens on a few prompts. ONNX Runtime's CPU kernels are not
TensorRT's, so this measures what the fold and fp16 storage and arithmetic in this graph cost, not
what a TensorRT engine will output.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline.cli import make_run_context, quiet_libraries
from pipeline.corpus import eval_token_ids
from pipeline.metrics import agreement, eval_windows, perplexity
from pipeline.modeling.hf import load_tokenizer
from pipeline.modeling.runtime import OrtCausalLM, greedy_decode, make_ort_session
from pipeline.modeling.tensorrt_graph import write_tensorrt_graph
from pipeline.plan import run_stages
from pipeline.recipe import load_recipe
from pipeline.stages.validate import score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

    console = Console()
    recipe = load_recipe(args.recipe)
    ctx = make_run_context(None, console)
    quiet_libraries()
    exported = run_stages(recipe, ctx, ("source", "quantize", "export"), console.print, Path.cwd())["export"]

    cfg = recipe.validation
    windows = [w for _, ids in eval_token_ids(load_tokenizer(exported.path), cfg) for w in eval_windows(ids, cfg.window)]
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {"exported (fp32)": OrtCausalLM(make_ort_session(exported.model_file))}
        for precision in ("fp32", "fp16"):
            path = Path(tmp) / f"tensorrt_{precision}.onnx"
            write_tensorrt_graph(exported.model_file, precision, path)
            graphs[f"TensorRT input, {precision}"] = OrtCausalLM(make_ort_session(path))
        scored = {name: score(lm, windows, lambda _n: None) for name, lm in graphs.items()}
        prompts = [np.asarray(w[:32], dtype=np.int64) for w in windows[: args.prompts]]
        greedy = {name: [greedy_decode(lm, p, args.new_tokens, lambda: 0.0)[0] for p in prompts] for name, lm in graphs.items()}

    reference = "exported (fp32)"
    table = Table(title=f"{recipe.name}: {sum(len(w) for w in windows)} held-out tokens, windows of {cfg.window}; ONNX Runtime CPU")
    for col in ("graph", "perplexity", "vs exported", "top-1 = exported", f"greedy = exported ({len(prompts)} prompts)"):
        table.add_column(col)
    ref_ppl = perplexity(scored[reference][0], scored[reference][1])
    for name, (nll, count, preds) in scored.items():
        ppl = perplexity(nll, count)
        same = sum(a == b for a, b in zip(greedy[name], greedy[reference]))
        table.add_row(name, f"{ppl:.4f}", f"{100 * (ppl - ref_ppl) / ref_ppl:+.3f} %",
                      f"{agreement(scored[reference][2], preds):.4f}", f"{same}/{len(prompts)}")
    console.print(table)


if __name__ == "__main__":
    main()
