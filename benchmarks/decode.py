"""Decode speed and accuracy of every peer, side by side in one sitting.

    bash benchmarks/setup_genai_env.sh     # once: onnxruntime-genai in its own environment
    .venv/bin/python benchmarks/decode.py recipes/smollm2-135m-gptq-int4-cpu-fast.yaml \
        --engines portable-fp32 fused-fp32 portable-int8 fused-int8 --rounds 3

Peers: the PyTorch fp32 source (eager), onnxruntime-genai's model builder int4 of the same
checkpoint (left out, and said so, when its environment is missing) with the Kiln engines' thread
count and again with its own default threads (speed only), and each Kiln engine variant
of the recipe (`--engines`), all from the recipe's one set of quantized weights: `portable-*` (the
exported opset-21 graph, ORT-optimized), `fused-*` (the ORT-specific graph with
GroupQueryAttention, KV cache in place), each with fp32 (exact dequantized math) or int8
activations inside MatMulNBits. The first engine is the reference for the accuracy columns.

Speed rounds alternate the peers, each run in a fresh process (peak RSS is the model's own);
medians are printed. Perplexity is computed once per peer on the recipe's held-out windows; the
greedy tokens of each Kiln engine are compared with the portable engine's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline.cli import make_run_context, quiet_libraries
from pipeline.corpus import eval_token_ids, in_domain_labels
from pipeline.latency import measure_in_subprocess
from pipeline.metrics import eval_windows, perplexity
from pipeline.modeling.hf import load_causal_lm, load_tokenizer
from pipeline.modeling.runtime import TorchCausalLM, greedy_decode
from pipeline.plan import run_stages
from pipeline.recipe import load_recipe
from pipeline.stages.validate import score
from pipeline.targets import get_target

HERE = Path(__file__).resolve().parent
GENAI_PYTHON = HERE.parent / "artifacts" / "bench" / "genai-venv" / "bin" / "python"


# Kiln engines this benchmark can build from one recipe (same quantized weights; build settings differ).
VARIANTS = {f"{graph}-{compute}": [f"build.graph={graph}", f"build.int4_compute={compute}"]
            for graph in ("portable", "fused") for compute in ("fp32", "int8")}


def build_engines(recipe_path: Path, variants: list[str], overrides: list[str], console: Console):
    """The recipe's stages up to build, once per variant (source/quantize/export are shared)."""
    ctx = make_run_context(None, console)
    engines, source = {}, None
    for variant in variants:
        recipe = load_recipe(recipe_path, [*overrides, *VARIANTS[variant]])
        done = run_stages(recipe, ctx, ("source", "quantize", "export", "build"), console.print, Path.cwd())
        source, engines[variant] = done["source"], done["build"]
    return recipe, source, engines, ctx.settings.artifacts_root


def run_genai(python: Path, command: str, model: Path, spec: dict, tmp: Path) -> dict:
    spec_file = tmp / f"genai_{command}.json"
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.run([str(python), str(HERE / "genai_peer.py"), command, "--model", str(model), "--spec", str(spec_file)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"onnxruntime-genai {command} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peer_model(python: Path, script: str, args: list[str], out: Path, marker: str, what: str, console: Console) -> Path:
    """A peer's model made once by its own tools in its own environment (`script` under benchmarks/),
    into `out` (done when `out/marker` exists), with its output in a log beside it."""
    if not (out / marker).is_file():
        log = out.with_name(out.name + ".build.log")
        console.print(f"building {what} into {out} (log: {log})")
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as handle:
            subprocess.run([str(python), str(HERE / script), *args, "--out", str(out)], check=True, stdout=handle,
                           stderr=subprocess.STDOUT)
    return out


def genai_model(python: Path, source, root: Path, console: Console) -> Path:
    out = root / "bench" / f"genai-int4-cpu-{(source.digest or source.path.name)[:16]}"
    return peer_model(python, "genai_peer.py", ["build", "--hf", str(source.model_dir)], out, "genai_config.json",
                      f"the onnxruntime-genai int4 model of {source.model_dir}", console)


def greedy_agreement(tokens: list[list[int]], reference: list[list[int]]) -> str:
    """'k/n' prompts with identical greedy tokens, plus where the others first differ."""
    firsts = [next((i for i, (a, b) in enumerate(zip(t, r)) if a != b), None) for t, r in zip(tokens, reference)]
    same = sum(f is None for f in firsts)
    differ = [f for f in firsts if f is not None]
    return f"{same}/{len(firsts)}" + (f" (first diff at {', '.join(map(str, differ))})" if differ else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--genai-python", type=Path, default=GENAI_PYTHON)
    parser.add_argument("--engines", nargs="+", choices=sorted(VARIANTS), default=["portable-fp32", "fused-fp32", "fused-int8"],
                        help="Kiln engines to build and compare; the first is the reference (ref) for accuracy columns")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                        help="recipe override applied to every Kiln engine (e.g. quantize.ignore=[])")
    parser.add_argument("--test-prompts", type=int, default=4, help="prompts from the held-out text for the greedy comparison")
    parser.add_argument("--skip-torch", action="store_true", help="leave out the PyTorch peer (slow: minutes per round)")
    args = parser.parse_args()

    console = Console()
    quiet_libraries()
    recipe, source, engines, root = build_engines(args.recipe, args.engines, args.overrides, console)
    tokenizer = load_tokenizer(next(iter(engines.values())).path)
    v = recipe.validation
    # perplexity out of domain (the texts other than the calibration text, pooled), and in domain beside it
    inside_labels = in_domain_labels(v, recipe.quantize.calibration.text)
    texts = eval_token_ids(tokenizer, v)
    outside, inside = [t for t in texts if t[0] not in inside_labels], [t for t in texts if t[0] in inside_labels]
    windows = [w for _, text in (outside or inside) for w in eval_windows(text, v.window)]
    inside_windows = [w for _, text in inside for w in eval_windows(text, v.window)] if outside else []
    ids = (outside or inside)[0][1]
    threads = next(iter(engines.values())).meta["session_options"]["threads"]
    common = {"prompt_ids": ids[: args.prompt_tokens], "new_tokens": args.new_tokens, "warmup": 1, "repeats": 1, "threads": threads}

    peers: dict[str, dict] = {}
    if not args.skip_torch:
        peers["PyTorch fp32 eager"] = {"kind": "kiln", "spec": {**common, "backend": "torch", "model_dir": str(source.model_dir)}}
    genai_note = None
    if args.genai_python.is_file():
        model = genai_model(args.genai_python, source, root, console)
        peers["onnxruntime-genai int4"] = {"kind": "genai", "model": model, "threads": threads}
        # What a user gets without setting threads: onnxruntime-genai's own default (one intra-op
        # thread on the 2-core machine here). Same model, so its accuracy columns are copied.
        peers["onnxruntime-genai int4, default threads"] = {"kind": "genai", "model": model, "threads": None,
                                                           "same_model_as": "onnxruntime-genai int4"}
    else:
        genai_note = f"onnxruntime-genai left out: no environment at {args.genai_python} (bash benchmarks/setup_genai_env.sh makes it)"
    for variant, engine in engines.items():
        peers[f"Kiln {variant}"] = {"kind": "kiln", "engine": engine, "spec": {
            **common, "backend": "engine", "target": engine.target, "engine_dir": str(engine.path), "engine_meta": dict(engine.meta)}}

    # Test prompts for greedy agreement: spread over the held-out text.
    step = max(1, (len(ids) - args.prompt_tokens) // args.test_prompts)
    prompts = [ids[i * step: i * step + args.prompt_tokens] for i in range(args.test_prompts)]
    console.print(f"perplexity on {sum(len(w) for w in windows)} held-out tokens in {len(windows)} windows of "
                  f"{', '.join(label for label, _ in outside or inside)}"
                  + (f" (in-domain beside: {', '.join(label for label, _ in inside)})" if inside_windows else "") + "; "
                  f"greedy on {len(prompts)} test prompts")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name, peer in peers.items():
            if "same_model_as" in peer:
                peer.update({k: peers[peer["same_model_as"]][k] for k in ("ppl", "ppl_in", "predictions", "greedy")})
            elif peer["kind"] == "genai":
                scored = run_genai(args.genai_python, "ppl", peer["model"], {"windows": [w.tolist() for w in windows], "threads": threads}, tmp)
                peer["ppl"], peer["predictions"] = scored["ppl"], np.asarray(scored["predictions"])
                peer["ppl_in"] = inside_windows and run_genai(args.genai_python, "ppl", peer["model"],
                                                              {"windows": [w.tolist() for w in inside_windows], "threads": threads}, tmp)["ppl"]
                peer["greedy"] = run_genai(args.genai_python, "greedy", peer["model"],
                                           {"prompts": prompts, "new_tokens": args.new_tokens, "threads": threads}, tmp)["tokens"]
            else:
                lm = (get_target(peer["engine"].target).load(peer["engine"].path, dict(peer["engine"].meta)) if "engine" in peer
                      else TorchCausalLM(load_causal_lm(source.model_dir)))
                nll, count, peer["predictions"] = score(lm, windows, lambda _n: None)
                peer["ppl"] = perplexity(nll, count)
                peer["ppl_in"] = inside_windows and perplexity(*score(lm, inside_windows, lambda _n: None)[:2])
                peer["greedy"] = [greedy_decode(lm, np.asarray(p, dtype=np.int64), args.new_tokens, time.perf_counter)[0] for p in prompts]
            console.print(f"  {name}: perplexity {peer['ppl']:.4f}")

        runs: dict[str, list[dict]] = {name: [] for name in peers}
        for r in range(args.rounds):
            for name, peer in peers.items():
                result = (run_genai(args.genai_python, "measure", peer["model"], {**common, "threads": peer["threads"]}, tmp)
                          if peer["kind"] == "genai"
                          else measure_in_subprocess(peer["spec"], tmp, name.replace(" ", "_")))
                runs[name].append(result)
            console.print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {runs[n][-1]['tokens_per_s']:.1f} tok/s" for n in peers))

    med = {name: {k: statistics.median(x[k] for x in rs) for k in ("tokens_per_s", "ttft_ms", "decode_p50_ms", "decode_p95_ms", "peak_rss_mb")}
           for name, rs in runs.items()}
    reference_name = f"Kiln {args.engines[0]}"
    fastest_peer = max([n for n in peers if not n.startswith("Kiln")] or [reference_name], key=lambda n: med[n]["tokens_per_s"])
    ref = peers[reference_name]
    table = Table(title=f"{recipe.name}: batch 1, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, greedy; "
                        f"medians of {args.rounds} alternating rounds, {threads} threads")
    columns = ("peer", "tokens/s", "TTFT (ms)", "p50 (ms)", "p95 (ms)", "peak RSS (MB)", "perplexity", "ppl vs ref",
               "in-domain ppl", "top-1 = ref", "greedy = ref", f"tok/s ÷ {fastest_peer}")
    for col in columns:
        table.add_column(col, justify="left" if col == "peer" else "right")
    for name, peer in peers.items():
        m = med[name]
        table.add_row(name, f"{m['tokens_per_s']:.1f}", f"{m['ttft_ms']:.1f}", f"{m['decode_p50_ms']:.2f}", f"{m['decode_p95_ms']:.2f}",
                      f"{m['peak_rss_mb']:.0f}", f"{peer['ppl']:.4f}", f"{(peer['ppl'] / ref['ppl'] - 1) * 100:+.2f} %",
                      f"{peer['ppl_in']:.4f}" if peer["ppl_in"] else "-",
                      f"{float(np.mean(peer['predictions'] == ref['predictions'])):.4f}", greedy_agreement(peer["greedy"], ref["greedy"]),
                      f"{m['tokens_per_s'] / med[fastest_peer]['tokens_per_s']:.2f}x")
    console.print(table)
    console.print(f"ref = {reference_name}. top-1 = ref: share of held-out positions where the peer's most likely next token is "
                  f"the reference's. greedy = ref: test prompts whose {args.new_tokens} greedy tokens equal the reference's "
                  "(else the first differing position).")
    for name in (n for n in peers if n.startswith("Kiln")):
        ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs[name], runs[fastest_peer])]
        console.print(f"{name} ÷ {fastest_peer}, round by round: " + ", ".join(f"{r:.2f}x" for r in ratios))
    if genai_note:
        console.print(genai_note)


if __name__ == "__main__":
    main()
