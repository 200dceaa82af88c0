"""onnxruntime-genai as a peer in benchmarks/decode.py. Runs in its own environment (made by
benchmarks/setup_genai_env.sh: onnxruntime-genai pins its own onnxruntime), never imports Kiln.

    PY=artifacts/bench/genai-venv/bin/python
    $PY benchmarks/genai_peer.py build   --hf HF_DIR --out MODEL_DIR      # the model builder, int4 CPU
    $PY benchmarks/genai_peer.py measure --model MODEL_DIR --spec S.json  # greedy decode latency (JSON)
    $PY benchmarks/genai_peer.py ppl     --model MODEL_DIR --spec S.json  # perplexity of its ONNX graph (JSON)
    $PY benchmarks/genai_peer.py greedy  --model MODEL_DIR --spec S.json  # greedy tokens for several prompts (JSON)
    $PY benchmarks/genai_peer.py ttft    --model MODEL_DIR --spec S.json  # time to first token per prompt length (JSON)

Perplexity runs the builder's own model.onnx in a plain ONNX Runtime session (the graph genai
runs), scoring the same token windows as Kiln's validate stage.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from window_scores import WindowScores


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build(hf_dir: Path, out: Path) -> None:
    cache = out.parent / (out.name + ".hf-cache")
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
                    "-p", "int4", "-e", "cpu", "-c", str(cache)], check=True)


def greedy_generator(model, prompt: list[int], new_tokens: int):
    """generate() -> (tokens, time to first token, decode step times), greedy, exactly new_tokens."""
    import onnxruntime_genai as og

    def generate() -> tuple[list[int], float, list[float]]:
        params = og.GeneratorParams(model)
        length = len(prompt) + new_tokens
        params.set_search_options(do_sample=False, max_length=length, min_length=length)
        generator = og.Generator(model, params)
        t0 = time.perf_counter()
        generator.append_tokens(prompt)
        generator.generate_next_token()
        tokens = [int(generator.get_next_tokens()[0])]
        ttft = time.perf_counter() - t0
        steps = []
        while len(tokens) < new_tokens:
            t = time.perf_counter()
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
            steps.append(time.perf_counter() - t)
        return tokens, ttft, steps

    return generate


def load_model(model_dir: Path, threads: int | None):
    """The builder's model with the Kiln engines' intra-op thread count. Left to itself it ran one
    thread on the 2-core machine here and oversubscribed two pinned cores of a 16-core one."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


def measure(model_dir: Path, spec: dict) -> dict:
    generate = greedy_generator(load_model(model_dir, spec.get("threads")), list(spec["prompt_ids"]), spec["new_tokens"])
    for _ in range(spec["warmup"]):
        generate()
    tokens, ttft, steps = generate()
    steps_ms = np.asarray(steps) * 1e3
    return {"tokens_per_s": len(steps) / float(np.sum(steps)), "ttft_ms": ttft * 1e3,
            "decode_p50_ms": float(np.percentile(steps_ms, 50)), "decode_p95_ms": float(np.percentile(steps_ms, 95)),
            "peak_rss_mb": peak_rss_mb(), "generated_ids": tokens}


def perplexity(model_dir: Path, spec: dict) -> dict:
    """Each window scored from an empty cache: inputs as the builder named them."""
    import onnxruntime as ort

    config = json.loads((model_dir / "genai_config.json").read_text())["model"]
    options = ort.SessionOptions()
    if spec.get("threads"):
        options.intra_op_num_threads = spec["threads"]
    session = ort.InferenceSession(str(model_dir / config["decoder"]["filename"]), options, providers=["CPUExecutionProvider"])
    kv_heads, head_dim = config["decoder"]["num_key_value_heads"], config["decoder"]["head_size"]
    names = {i.name for i in session.get_inputs()}
    scores = WindowScores()
    for window in spec["windows"]:
        ids = np.asarray(window, dtype=np.int64)[None, :]
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "position_ids" in names:
            feeds["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None, :]
        for name in names:
            if name.startswith("past_key_values"):
                feeds[name] = np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)
        scores.add(session.run(["logits"], feeds)[0][0], window)
    return scores.result()


def greedy(model_dir: Path, spec: dict) -> dict:
    model = load_model(model_dir, spec.get("threads"))
    return {"tokens": [greedy_generator(model, list(p), spec["new_tokens"])()[0] for p in spec["prompts"]]}


def ttft(model_dir: Path, spec: dict) -> dict:
    """Best time to the first token per prompt length ({"prompts": {"N": [[ids], ...]}}); the first prompt of each length is a warm-up."""
    model = load_model(model_dir, spec.get("threads"))
    best = {}
    for length, batch in spec["prompts"].items():
        times = [greedy_generator(model, list(prompt), 1)()[1] * 1e3 for prompt in batch]
        best[length] = min(times[1:])
    return {"ttft_ms": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build", "measure", "ppl", "greedy", "ttft"])
    parser.add_argument("--hf", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--spec", type=Path)
    args = parser.parse_args()
    if args.command == "build":
        build(args.hf, args.out)
        return
    spec = json.loads(args.spec.read_text())
    result = {"measure": measure, "ppl": perplexity, "greedy": greedy, "ttft": ttft}[args.command](args.model, spec)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
