"""Memory, disk and time per stage for random-weight Llama models of real shapes (issue 14).

    .venv/bin/python benchmarks/scale.py --shapes 135m                      # SmolLM2's shapes, vocab 49152
    .venv/bin/python benchmarks/scale.py --shapes 135m 1b 3b --vocab 49152 128256
    .venv/bin/python benchmarks/scale.py --shapes 1b --method gptq          # GPTQ through llm-compressor

Each (shape, vocab) runs in its own process (so one run's freed memory cannot count in the next)
the tiny recipe's stages (RTN int4 g32 or GPTQ, onnxruntime-cpu fused graph, validation, package,
registration into a temporary store) on a `random_model` source of that shape, written in bfloat16
with a tied head as the real configs have it, and prints per stage the wall time, peak RSS (the
stage's own, and its children's) and disk written, read from the stage manifests the runner writes;
then the goals of issue 14 against the measured numbers (every stage's peak ≤ 1.5 × the bf16
checkpoint + 2 GB; disk of one build, MLflow store included, ≤ 3 × the engine + the source) and
the engine's tokens/s and TTFT. A run that fails (e.g. killed for memory) is reported with the
stage it reached.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.artifacts import read_manifest  # noqa: E402

TINY = ROOT / "recipes" / "tiny-llama-int4-cpu.yaml"
STAGES = ("source", "quantize", "export", "build", "validate", "package", "register")
# Llama-family shapes of SmolLM2-135M, Llama-3.2-1B and Llama-3.2-3B: (hidden, intermediate, layers, heads, kv heads)
SHAPES = {"135m": (576, 1536, 30, 9, 3), "1b": (2048, 8192, 16, 32, 8), "3b": (3072, 8192, 28, 24, 8)}
GPTQ_CALIBRATION = "{samples: 8, seq_len: 256}"  # a CPU-sized calibration set


def overrides(shape: str, vocab: int, method: str) -> list[str]:
    hidden, inter, layers, heads, kv = SHAPES[shape]
    model = (f"{{family: llama, hidden_size: {hidden}, intermediate_size: {inter}, num_hidden_layers: {layers}, "
             f"num_attention_heads: {heads}, num_key_value_heads: {kv}, max_position_embeddings: 2048, "
             f"config: {{vocab_size: {vocab}, tie_word_embeddings: true, "
             f"rope_parameters: {{rope_type: default, rope_theta: 10000.0}}}}}}")
    sets = [f"source.random_model={model}", "source.dtype=bfloat16", f"register.model_name=scale-{shape}-{vocab}",
            "validate.on_gate_failure=warn", "validate.compare_source_speed=false",
            "build.max_sequence_length=512", "validate.max_eval_tokens=1024", "validate.window=256",
            "validate.latency={prompt_tokens: 64, new_tokens: 32, warmup: 1, repeats: 2}", f"quantize.method={method}"]
    if method == "gptq":
        sets.append(f"quantize.calibration={GPTQ_CALIBRATION}")
    return sets


def folder_mb(folder: Path) -> float:
    """Bytes on disk under a folder, each hard-linked file once."""
    seen, total = set(), 0
    for p in folder.rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total / 1e6


def run_one(shape: str, vocab: int, method: str, root: Path) -> dict:
    """One (shape, vocab) in this process, under `root`: the stages, then what their manifests recorded."""
    from pipeline.cli import make_run_context, quiet_libraries
    from pipeline.errors import KilnError
    from pipeline.plan import run_stages
    from pipeline.recipe import load_recipe

    quiet_libraries()
    console = Console(stderr=True)
    t0 = time.perf_counter()
    error = None
    try:
        run_stages(load_recipe(TINY, overrides(shape, vocab, method)), make_run_context(root, console), STAGES,
                   console.print, ROOT)
    except KilnError as e:
        error = str(e)[:300]
    rows, metrics, sizes = [], None, {}
    for stage in STAGES:  # whatever was built, in order
        entries = sorted((root / "cache" / stage).glob("[0-9a-f]*"), key=lambda p: p.stat().st_mtime)
        if not entries:
            break
        manifest = read_manifest(entries[-1])
        rows.append({"stage": stage, "seconds": manifest["seconds"], **manifest.get("resources", {})})
        if stage == "validate":
            metrics = manifest["meta"]["metrics"]
        if stage == "source":
            sizes["checkpoint_mb"] = folder_mb(entries[-1] / "model")
        if stage == "build":
            sizes["engine_mb"] = folder_mb(entries[-1])
    sizes["total_disk_mb"] = folder_mb(root)
    return {"shape": shape, "vocab": vocab, "method": method, "seconds": time.perf_counter() - t0,
            "error": error, "stages": rows, "metrics": metrics, **sizes}


def print_result(r: dict, out: Console) -> None:
    mem_goal = 1.5 * r.get("checkpoint_mb", 0) + 2000
    title = (f"Llama {r['shape']} shapes, vocab {r['vocab']}, bf16 checkpoint {r.get('checkpoint_mb', 0):,.0f} MB, "
             f"{r['method'].upper()} int4 g32, onnxruntime-cpu ({r['seconds']:.0f} s"
             f"{'; FAILED: ' + r['error'] if r['error'] else ''})")
    table = Table(title=title)
    for column in ("stage", "seconds", "peak RSS MB", "children peak RSS MB", f"≤ {mem_goal:,.0f} MB goal",
                   "disk written MB", "disk linked MB"):
        table.add_column(column, justify="right")
    for s in r["stages"]:
        peak = max(s.get("peak_rss_mb") or 0, s.get("children_peak_rss_mb") or 0)
        cells = [f"{s[k]:,.0f}" if s.get(k) is not None else "-" for k in ("peak_rss_mb", "children_peak_rss_mb")]
        disk = [f"{s[k]:,.0f}" if s.get(k) is not None else "-" for k in ("disk_written_mb", "disk_linked_mb")]
        table.add_row(s["stage"], f"{s['seconds']:.1f}", *cells, "yes" if peak <= mem_goal else "NO", *disk)
    out.print(table)
    if "engine_mb" in r:
        disk_goal = 3 * r["engine_mb"] + r["checkpoint_mb"]
        out.print(f"disk for the whole build (cache + MLflow store, hard links once): {r['total_disk_mb']:,.0f} MB; "
                  f"goal 3 × engine {r['engine_mb']:,.0f} + source {r['checkpoint_mb']:,.0f} = {disk_goal:,.0f} MB: "
                  f"{'met' if r['total_disk_mb'] <= disk_goal else 'NOT met'}")
    if r["metrics"]:
        out.print(json.dumps({k: round(r["metrics"][k], 2) for k in ("tokens_per_s", "ttft_ms", "peak_rss_mb", "ppl_increase_pct")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["135m"], choices=list(SHAPES))
    parser.add_argument("--vocab", nargs="+", type=int, default=[49152])
    parser.add_argument("--method", default="rtn", choices=["rtn", "gptq"])
    parser.add_argument("--one", nargs=3, metavar=("SHAPE", "VOCAB", "ROOT"), help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.method, Path(args.one[2]))))
        return
    # A stopped benchmark (SIGTERM) kills its child and removes the child's folder on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = Console(width=200)
    (ROOT / "artifacts").mkdir(exist_ok=True)
    for shape in args.shapes:
        for vocab in args.vocab:
            # the parent owns the folder, so a child killed for memory leaves nothing behind
            with tempfile.TemporaryDirectory(dir=ROOT / "artifacts") as tmp:
                child = subprocess.run([sys.executable, __file__, "--one", shape, str(vocab), tmp, "--method", args.method],
                                       stdout=subprocess.PIPE, text=True)
            lines = child.stdout.strip().splitlines()
            if child.returncode != 0 or not lines:
                out.print(f"Llama {shape} shapes, vocab {vocab}: the run's process died (exit {child.returncode}; "
                          f"a negative number is the signal, e.g. -9 when killed for memory)")
                continue
            print_result(json.loads(lines[-1]), out)


if __name__ == "__main__":
    main()
