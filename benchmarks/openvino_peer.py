"""The OpenVINO peer, run inside its own environment (benchmarks/setup_openvino_env.sh).

    export --hf FOLDER --out DIR [--group-size 32]        optimum-cli export openvino --weight-format int4 (nncf;
                                                         its other defaults); group 32 as Kiln's recipes (nncf's
                                                         default 128 does not divide SmolLM2's 576 channels)
    ppl --model DIR --spec SPEC.json                     perplexity and greedy predictions over token windows,
                                                         the OpenVINO runtime (optimum-intel's model class)
    ttft --model DIR --spec SPEC.json                    OpenVINO GenAI's LLMPipeline: time to the first token of
                                                         each prompt ({"prompts": {"N": [[ids], ...]}, "threads"}),
                                                         the first prompt of each length a warm-up, prefix caching off
    lookup --model DIR --spec SPEC.json                  LLMPipeline plain and with its prompt lookup on the same prompts
                                                         ({"prompts": [[ids]], "max_tokens", "rounds", "threads",
                                                         "num_assistant_tokens", "max_ngram_size"}): decode tokens/s

The model is the one OpenVINO GenAI's LLMPipeline runs; optimum-intel's OVModelForCausalLM runs the
same IR on the same runtime and returns the logits at every position, which LLMPipeline does not.
Prints one JSON line last."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from window_scores import WindowScores


def export(hf: Path, out: Path, group_size: int) -> dict:
    cli = Path(sys.executable).with_name("optimum-cli")
    subprocess.run([str(cli), "export", "openvino", "--model", str(hf), "--task", "text-generation-with-past",
                    "--weight-format", "int4", "--group-size", str(group_size), str(out)], check=True)
    config = out / "openvino_config.json"
    return {"out": str(out), "quantization": json.loads(config.read_text()).get("quantization_config") if config.is_file() else None}


def perplexity(model_dir: Path, windows: list[list[int]], threads: int) -> dict:
    import torch
    from optimum.intel import OVModelForCausalLM

    model = OVModelForCausalLM.from_pretrained(model_dir, ov_config={"INFERENCE_NUM_THREADS": str(threads)})
    scores = WindowScores()
    for window in windows:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([window]), attention_mask=torch.ones(1, len(window), dtype=torch.long)).logits
        scores.add(logits[0].float().numpy(), window)
    return scores.result()


def ttft(model_dir: Path, prompts: dict[str, list[list[int]]], threads: int) -> dict:
    import time

    import numpy as np
    import openvino as ov
    import openvino_genai

    scheduler = openvino_genai.SchedulerConfig()
    scheduler.enable_prefix_caching = False  # a warm prompt must not make the next one a cache hit
    pipe = openvino_genai.LLMPipeline(str(model_dir), "CPU", INFERENCE_NUM_THREADS=threads, scheduler_config=scheduler)
    config = openvino_genai.GenerationConfig()
    config.max_new_tokens = 1
    best = {}
    for length, batch in prompts.items():
        times = []
        for ids in batch:
            started = time.perf_counter()
            pipe.generate(ov.Tensor(np.asarray([ids], dtype=np.int64)), config)
            times.append((time.perf_counter() - started) * 1e3)
        best[length] = min(times[1:])
    return {"ttft_ms": best}


def lookup(model_dir: Path, spec: dict) -> dict:
    """Decode tokens/s (after the first token, from LLMPipeline's own perf metrics), plain and with
    prompt lookup, best of `rounds` per prompt, summed over prompts; and how many prompts gave the
    same greedy tokens both ways."""
    import numpy as np
    import openvino as ov
    import openvino_genai

    def pipeline(**options):
        scheduler = openvino_genai.SchedulerConfig()
        scheduler.enable_prefix_caching = False
        return openvino_genai.LLMPipeline(str(model_dir), "CPU", INFERENCE_NUM_THREADS=spec["threads"], scheduler_config=scheduler, **options)

    pipes = {"plain": pipeline(), "lookup": pipeline(prompt_lookup=True)}
    configs = {name: pipe.get_generation_config() for name, pipe in pipes.items()}
    for name, config in configs.items():
        config.max_new_tokens, config.do_sample = spec["max_tokens"], False
        if name == "lookup":
            config.num_assistant_tokens, config.max_ngram_size = spec["num_assistant_tokens"], spec["max_ngram_size"]
    totals = {name: [0.0, 0] for name in pipes}
    same = 0
    for ids in spec["prompts"]:
        best, tokens = {}, {}
        for _ in range(spec["rounds"]):
            for name, pipe in pipes.items():
                result = pipe.generate(ov.Tensor(np.asarray([ids], dtype=np.int64)), configs[name])
                metrics = result.perf_metrics
                seconds = (metrics.get_generate_duration().mean - metrics.get_ttft().mean) / 1e3
                tokens[name] = list(result.tokens[0])
                best[name] = min(seconds, best.get(name, seconds))
        same += tokens["plain"] == tokens["lookup"]
        for name in pipes:
            totals[name][0] += best[name]
            totals[name][1] += len(tokens[name]) - 1
    return {**{name: count / seconds for name, (seconds, count) in totals.items()}, "same": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["export", "ppl", "ttft", "lookup"])
    parser.add_argument("--hf", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--spec", type=Path)
    args = parser.parse_args()
    if args.command == "export":
        result = export(args.hf, args.out, args.group_size)
    elif args.command == "lookup":
        result = lookup(args.model, json.loads(args.spec.read_text()))
    elif args.command == "ttft":
        spec = json.loads(args.spec.read_text())
        result = ttft(args.model, spec["prompts"], spec.get("threads", 2))
    else:
        spec = json.loads(args.spec.read_text())
        result = perplexity(args.model, spec["windows"], spec.get("threads", 2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
