"""Accuracy out of domain, Kiln's builds against the peers' int4 models, on the same tokens (issue 25).

    .venv/bin/python benchmarks/accuracy_peers.py recipes/smollm2-135m-int4-cpu.yaml \
        recipes/smollm2-135m-gptq-int4-cpu.yaml recipes/smollm2-135m-gptq-int4-cpu-fast.yaml \
        recipes/smollm2-135m-awq-int4-cpu.yaml

Every row is scored on the first recipe's evaluation texts, tokenized once: the texts other than
the calibration text pooled (what validate gates on), each of them alone, and the calibration
corpus's held-out part (in-domain) beside them. Rows:

- the fp32 source (PyTorch), the reference of every "increase" and "agreement";
- each recipe's Kiln engine (its stages up to build, reused from the cache when built before);
- onnxruntime-genai's int4 CPU model (its model builder on the same fp32 source; environment:
  benchmarks/setup_genai_env.sh), if that environment exists;
- llama.cpp Q4_0 and Q4_K_M: `llama_model_quantize` on the recipe's GGUF source file (requantized:
  llama.cpp dequantizes it to the very f32 weights Kiln's source holds), or on the F32 file llama.cpp's
  own `convert_hf_to_gguf.py` writes from a Hugging Face source (the llama.cpp tree in
  llama-cpp-python's source distribution, `--llama-src`); scored by llama-cpp-python (environment:
  benchmarks/setup_llamacpp_env.sh; benchmarks/llamacpp_peer.py).
  The converted vocabulary keeps the source tokenizer's ids (checked on the eval text).
- OpenVINO int4: `optimum-cli export openvino --weight-format int4 --group-size 32` (nncf's other defaults)
  on the same fp32 source, scored on the OpenVINO runtime (environment: benchmarks/setup_openvino_env.sh;
  benchmarks/openvino_peer.py), if that environment exists.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from decode import GENAI_PYTHON, genai_model, peer_model, run_genai
from rich.console import Console
from rich.table import Table

from pipeline.cli import make_run_context, quiet_libraries
from pipeline.corpus import eval_token_ids, in_domain_labels, load_text
from pipeline.metrics import eval_windows, perplexity
from pipeline.modeling.hf import load_causal_lm, load_tokenizer
from pipeline.modeling.runtime import TorchCausalLM
from pipeline.plan import run_stages
from pipeline.recipe import load_recipe
from pipeline.stages.source import resolve_path
from pipeline.stages.validate import score
from pipeline.targets import get_target

HERE = Path(__file__).resolve().parent
LLAMA_PYTHON = HERE.parent / "artifacts" / "bench" / "llamacpp-venv" / "bin" / "python"  # benchmarks/setup_llamacpp_env.sh
OPENVINO_PYTHON = HERE.parent / "artifacts" / "bench" / "openvino-venv" / "bin" / "python"  # benchmarks/setup_openvino_env.sh
LLAMA_SRC = HERE.parent / "artifacts" / "bench" / "src" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"


def llama_gguf(source, recipe, llama_src: Path, root: Path, kind: str, console: Console) -> Path:
    """The source quantized to `kind` by llama.cpp's own quantizer. A GGUF source is requantized
    from its own file (llama.cpp dequantizes it to f32 first: the same weights as Kiln's fp32
    source, whose values are that file's dequantized ones); a Hugging Face source goes through
    llama.cpp's convert_hf_to_gguf.py (F32) first."""
    out_dir = root / "bench" / f"llamacpp-{(source.digest or source.path.name)[:16]}"
    out_dir.mkdir(parents=True, exist_ok=True)
    origin = resolve_path(recipe.source.path) if recipe.source.path else None
    if origin is not None and origin.suffix == ".gguf":
        start, requantize = origin, ["--allow-requantize"]
    else:
        start, requantize = out_dir / "model-f32.gguf", []
        if not start.is_file():
            console.print(f"converting {source.model_dir} with llama.cpp's convert_hf_to_gguf.py")
            env = {**os.environ, "PYTHONPATH": str(llama_src / "gguf-py")}
            subprocess.run([str(LLAMA_PYTHON), str(llama_src / "convert_hf_to_gguf.py"), str(source.model_dir), "--outtype", "f32",
                            "--outfile", str(start)], check=True, env=env, capture_output=True)
    quantized = out_dir / f"model-{kind}.gguf"
    if not quantized.is_file():
        subprocess.run([str(LLAMA_PYTHON), str(HERE / "llamacpp_peer.py"), "quantize", "--gguf", str(start), "--out", str(quantized),
                        "--type", kind, *requantize], check=True, capture_output=True)
    return quantized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", type=Path, nargs="+")
    parser.add_argument("--genai-python", type=Path, default=GENAI_PYTHON)
    parser.add_argument("--llama-src", type=Path, default=LLAMA_SRC, help="llama.cpp source tree (with convert_hf_to_gguf.py)")
    parser.add_argument("--openvino-python", type=Path, default=OPENVINO_PYTHON)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    console = Console(width=200)
    quiet_libraries()
    ctx = make_run_context(None, console)

    first = load_recipe(args.recipes[0])
    source = run_stages(first, ctx, ("source",), console.print, Path.cwd())["source"]
    tokenizer = load_tokenizer(source.model_dir)
    v, calibration = first.validation, first.quantize.calibration.text
    texts = {label: eval_windows(ids, v.window) for label, ids in eval_token_ids(tokenizer, v)}
    inside = in_domain_labels(v, calibration)
    outside = [label for label in texts if label not in inside]
    console.print(f"texts: {', '.join(f'{k} ({sum(len(w) for w in ws)} tokens)' for k, ws in texts.items())}; "
                  f"out of domain: {', '.join(outside)}; in-domain: {', '.join(inside) or 'none'}")

    scorers = {"fp32 source (PyTorch)": lambda ws, _tmp: score_lm(TorchCausalLM(load_causal_lm(source.model_dir)), ws)}
    for path in args.recipes:
        recipe = load_recipe(path)
        engine = run_stages(recipe, ctx, ("source", "quantize", "export", "build"), console.print, Path.cwd())["build"]
        scorers[f"Kiln {recipe.name}"] = lambda ws, _tmp, e=engine: score_lm(get_target(e.target).load(e.path, dict(e.meta)), ws)
    if args.genai_python.is_file():
        genai = genai_model(args.genai_python, source, ctx.settings.artifacts_root, console)
        scorers["onnxruntime-genai int4"] = lambda ws, tmp: genai_score(args.genai_python, genai, ws, tmp, args.threads)
    else:
        console.print(f"onnxruntime-genai left out: no environment at {args.genai_python} (benchmarks/setup_genai_env.sh)")
    if (args.llama_src / "convert_hf_to_gguf.py").is_file() and LLAMA_PYTHON.is_file():
        for kind in ("q4_0", "q4_k_m"):
            gguf = llama_gguf(source, first, args.llama_src, ctx.settings.artifacts_root, kind, console)
            scorers[f"llama.cpp {kind.upper()}"] = lambda ws, tmp, g=gguf: peer_perplexity(
                LLAMA_PYTHON, "llamacpp_peer.py", ["--gguf", str(g)], ws, tmp, args.threads)
        same_ids(gguf, tokenizer, v, console)
    else:
        console.print("llama.cpp left out: no environment (bash benchmarks/setup_llamacpp_env.sh makes it)")
    if args.openvino_python.is_file():
        openvino = openvino_model(args.openvino_python, source, ctx.settings.artifacts_root, console)
        scorers["OpenVINO int4 g32 (nncf)"] = lambda ws, tmp: peer_perplexity(
            args.openvino_python, "openvino_peer.py", ["--model", str(openvino)], ws, tmp, args.threads)
    else:
        console.print(f"OpenVINO left out: no environment at {args.openvino_python} (benchmarks/setup_openvino_env.sh)")

    rows = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        for name, scorer in scorers.items():
            per_text = {label: scorer(windows, Path(tmp_name)) for label, windows in texts.items()}
            # pooled over the out-of-domain texts' tokens: perplexity is exp(mean NLL), so weigh each log by its tokens
            counts = {label: sum(len(w) - 1 for w in texts[label]) for label in outside}
            pooled = (float(np.exp(sum(np.log(per_text[t][0]) * counts[t] for t in outside) / sum(counts.values()))),
                      np.concatenate([per_text[t][1] for t in outside]))
            rows[name] = {"pooled": pooled, "texts": per_text}
            console.print(f"  {name}: out-of-domain perplexity {pooled[0]:.3f}")

    ref = rows["fp32 source (PyTorch)"]
    table = Table(title=f"perplexity increase vs the fp32 source, out of domain ({' + '.join(outside)}) and in-domain "
                        f"({', '.join(inside) or '-'}); {args.threads} threads")
    for col in ("model", "perplexity (out of domain)", "increase", "agreement", *(f"increase: {t}" for t in texts)):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, row in rows.items():
        ppl, preds = row["pooled"]
        table.add_row(name, f"{ppl:.3f}", f"{100 * (ppl / ref['pooled'][0] - 1):+.2f} %",
                      f"{float(np.mean(preds == ref['pooled'][1])):.3f}",
                      *(f"{100 * (row['texts'][t][0] / ref['texts'][t][0] - 1):+.2f} %" + (" (in-domain)" if t in inside else "")
                        for t in texts))
    console.print(table)


def same_ids(gguf: Path, tokenizer, v, console: Console) -> None:
    """Whether llama.cpp's tokenizer (the GGUF file's) splits each evaluation text as the source
    tokenizer does. Every row is scored on the source tokenizer's ids, which index the same
    vocabulary in both, so a different split is reported, not corrected."""
    with tempfile.TemporaryDirectory() as tmp:
        for text_cfg in v.eval_text:
            text = load_text(text_cfg, "eval", "validate.eval_text")[:20_000]
            (Path(tmp) / "t.txt").write_text(text)
            proc = subprocess.run([str(LLAMA_PYTHON), str(HERE / "llamacpp_peer.py"), "tokenize", "--gguf", str(gguf),
                                   "--text-file", str(Path(tmp) / "t.txt")], capture_output=True, text=True, check=True)
            ours = tokenizer(text, add_special_tokens=False)["input_ids"]
            theirs = json.loads(proc.stdout.strip().splitlines()[-1])
            if ours == theirs:
                console.print(f"llama.cpp's tokenizer: the source's ids on {text_cfg.label} ({len(ours)} tokens)")
                continue
            first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            console.print(f"llama.cpp's tokenizer splits {text_cfg.label} differently from token {first} of {len(ours)}: "
                          f"source {tokenizer.convert_ids_to_tokens(ours[first:first + 4])} vs llama.cpp "
                          f"{tokenizer.convert_ids_to_tokens(theirs[first:first + 4])}")


def openvino_model(python: Path, source, root: Path, console: Console) -> Path:
    out = root / "bench" / f"openvino-int4-{(source.digest or source.path.name)[:16]}"
    return peer_model(python, "openvino_peer.py", ["export", "--hf", str(source.model_dir)], out, "openvino_model.xml",
                      f"the OpenVINO int4 model of {source.model_dir}", console)


def peer_perplexity(python: Path, script: str, model_args: list[str], windows, tmp: Path, threads: int) -> tuple[float, np.ndarray]:
    """A peer script's `ppl` command (llamacpp_peer.py, openvino_peer.py) on the windows."""
    spec = tmp / "peer_spec.json"
    spec.write_text(json.dumps({"windows": [w.tolist() for w in windows], "threads": threads}))
    proc = subprocess.run([str(python), str(HERE / script), "ppl", *model_args, "--spec", str(spec)],
                          capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["ppl"], np.asarray(result["predictions"])


def score_lm(lm, windows) -> tuple[float, np.ndarray]:
    nll, count, predictions = score(lm, windows, lambda _n: None)
    return perplexity(nll, count), predictions


def genai_score(python: Path, model: Path, windows, tmp: Path, threads: int) -> tuple[float, np.ndarray]:
    scored = run_genai(python, "ppl", model, {"windows": [w.tolist() for w in windows], "threads": threads}, tmp)
    return scored["ppl"], np.asarray(scored["predictions"])


if __name__ == "__main__":
    main()
