"""Speculative decoding with prompt lookup (issue 27), engine alone, one request at a time: Kiln's
decode tokens/s with and without `package.speculative: {method: prompt_lookup}`, on input-grounded
prompts (summarise, extract, rewrite, edit code: the answer copies spans of the prompt) and on
open-ended chat prompts (it should cost little there), greedy, through the scheduler the Triton
and MLflow models run.

    .venv/bin/python benchmarks/speculative.py artifacts/cache/build/<key> [--rounds 2] [--max-tokens 128] \
        [--openvino-model artifacts/bench/openvino-int4-<digest>]

Prompts: 24 input-grounded ones built from Python's own documentation (`pydoc_data.topics`, four
tasks over six topics each) and 8 open-ended ones, in the model's chat template. Per prompt, plain
and speculative runs alternate; decode tokens/s = tokens after the first / time after the first
token, summed over prompts. Greedy identity is checked prompt by prompt (the multi-token forward
may round differently from the one-token one; differing prompts are counted, not hidden, with plain
decoding's gap between its two best logits where the two first differ).

`--draft-engine DIR`: rows for a draft model too (`package.speculative: {method: draft}`), another
build folder of the same vocabulary, e.g. the fast int8 engine drafting for an fp32-compute one.

`--openvino-model`: OpenVINO GenAI's LLMPipeline on the same prompts and threads, plain and with its
own prompt lookup (`prompt_lookup=True`, `num_assistant_tokens` and `max_ngram_size` as Kiln's),
from its own environment (benchmarks/setup_openvino_env.sh). llama.cpp is not a row: llama-cpp-python
0.3.36 crashes on this machine whenever it evaluates more than one token per batch (benchmarks/prefill.py),
which verification needs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline.artifacts import read_manifest
from pipeline.engine import GenerationRequest, Scheduler
from pipeline.serving.gateway import chat_template, special_tokens
from pipeline.targets import get_target

HERE = Path(__file__).resolve().parent
OPENVINO_PYTHON = HERE.parent / "artifacts" / "bench" / "openvino-venv" / "bin" / "python"
SPECULATIVE = {"method": "prompt_lookup", "max_draft_tokens": 8, "max_ngram": 3}
TASKS = [
    "Summarize the following documentation in three sentences, reusing its own wording.",
    "Extract every sentence of the following documentation that mentions a keyword, one per line.",
    "Rewrite the following documentation as a numbered list of its statements, keeping the wording.",
    "Copy the following documentation and wrap every Python name in backticks.",
]
TOPICS = ["assert", "assignment", "break", "continue", "del", "for", "global", "if", "import", "pass", "return", "while"]
OPEN_ENDED = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are three good habits for a new programmer? Explain each briefly.",
    "Describe the view from a mountain top at sunrise.",
    "Give me ideas for a birthday party for a seven-year-old.",
    "Why is the sky blue? Explain it to a child.",
    "Write a poem about autumn rain.",
    "What should I pack for a week-long hiking trip?",
    "Invent a new board game and explain its rules.",
]


def grounded_texts() -> list[str]:
    from pydoc_data.topics import topics

    texts = []
    for i, task in enumerate(TASKS):
        for topic in TOPICS[(i % 2) * 6:(i % 2) * 6 + 6]:
            doc = " ".join(topics[topic].split())[:900]
            texts.append(f"{task}\n\n{doc}")
    return texts


def chat_prompts(engine: Path, texts: list[str], tokenizer) -> list[list[int]]:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = ImmutableSandboxedEnvironment().from_string(chat_template(engine))
    return [tokenizer.encode(template.render(messages=[{"role": "user", "content": t}], add_generation_prompt=True,
                                             **special_tokens(engine)), add_special_tokens=False).ids for t in texts]


def generate(lm, tokenizer, eos: set[int], prompt: list[int], max_tokens: int, speculative, draft_lm=None) -> tuple[list[int], float, int, dict]:
    """Greedy through a one-row scheduler: ids, seconds after the first token, tokens after it, draft stats."""
    scheduler = Scheduler(lm, tokenizer, eos, 1, speculative=speculative, draft_lm=draft_lm)
    times = []
    row = scheduler.admit(GenerationRequest(tuple(prompt), max_tokens), lambda delta, finish: times.append(time.perf_counter()))
    while scheduler.active:
        scheduler.step()
    return row.seq.ids, times[-1] - times[0], len(row.seq.ids) - 1, scheduler.draft_stats


def divergence_margin(lm, prompt: list[int], plain: list[int], other: list[int]) -> float:
    """Where the speculative tokens first differ from plain decoding's: the gap between plain
    decoding's two best logits at that position (a small gap: two kernels rounding a near-tie apart)."""
    first = next(i for i, (a, b) in enumerate(zip(plain, other)) if a != b)
    logits, state = lm.forward(np.asarray([prompt], dtype=np.int64), None, last_only=True)
    for token in plain[:first]:
        logits, state = lm.forward(np.asarray([[token]], dtype=np.int64), state, kernel="decode")
    top = np.sort(logits[0, -1])[-2:]
    return float(top[1] - top[0])


def kiln_rows(lm, tokenizer, eos, prompts, max_tokens: int, rounds: int, speculative: dict, draft_lm=None) -> dict:
    from pipeline.engine import DraftStats

    plain = {"seconds": 0.0, "tokens": 0}
    spec = {"seconds": 0.0, "tokens": 0}
    stats, same, margins = DraftStats(), 0, []
    for prompt in prompts:
        best = {}
        for _ in range(rounds):
            for name, options in (("plain", None), ("spec", speculative)):
                ids, seconds, tokens, drafts = generate(lm, tokenizer, eos, prompt, max_tokens, options, draft_lm)
                if name not in best or seconds < best[name][1]:
                    best[name] = (ids, seconds, tokens, drafts)
        if best["plain"][0] == best["spec"][0]:
            same += 1
        else:
            margins.append(divergence_margin(lm, prompt, best["plain"][0], best["spec"][0]))
        stats.merge(best["spec"][3])
        for total, name in ((plain, "plain"), (spec, "spec")):
            total["seconds"] += best[name][1]
            total["tokens"] += best[name][2]
    return {"plain": plain["tokens"] / plain["seconds"], "spec": spec["tokens"] / spec["seconds"], "same": same,
            "prompts": len(prompts), "drafts": stats.as_dict(), "margins": margins}


def openvino_rows(model: Path, prompts: list[list[int]], max_tokens: int, rounds: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"prompts": prompts, "max_tokens": max_tokens, "rounds": rounds, "threads": threads,
                                    "num_assistant_tokens": SPECULATIVE["max_draft_tokens"], "max_ngram_size": SPECULATIVE["max_ngram"]}))
        proc = subprocess.run([str(OPENVINO_PYTHON), str(HERE / "openvino_peer.py"), "lookup", "--model", str(model), "--spec", str(spec)],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"OpenVINO GenAI failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine", type=Path, help="a build stage folder (fused ONNX Runtime graph)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--openvino-model", type=Path)
    parser.add_argument("--draft-engine", type=Path, help="also a draft model: another build folder of the same vocabulary")
    parser.add_argument("--no-lookup", action="store_true", help="skip the prompt lookup rows")
    args = parser.parse_args()
    from tokenizers import Tokenizer

    meta = read_manifest(args.engine)["meta"]
    lm = get_target(meta["target"]).load(args.engine, meta)
    tokenizer = Tokenizer.from_file(str(args.engine / "tokenizer.json"))
    generation = json.loads((args.engine / "generation_config.json").read_text())
    eos = set(np.atleast_1d(generation.get("eos_token_id", [])).tolist())
    sets = {"input-grounded": chat_prompts(args.engine, grounded_texts(), tokenizer),
            "open-ended": chat_prompts(args.engine, OPEN_ENDED, tokenizer)}
    methods = [] if args.no_lookup else [("prompt lookup", SPECULATIVE, None)]
    if args.draft_engine:
        from pipeline.modeling.runtime import load_draft_engine

        draft = {"method": "draft", "max_draft_tokens": SPECULATIVE["max_draft_tokens"], "draft_engine": str(args.draft_engine.resolve())}
        methods.append((f"draft model {args.draft_engine.name[:12]}", draft, load_draft_engine(draft, "/")))
    for _, speculative, draft_lm in methods:
        generate(lm, tokenizer, eos, sets["open-ended"][0], 8, speculative, draft_lm)  # warm-up
    console = Console(width=200)
    table = Table(title=f"{args.engine.name[:12]}: greedy, max_tokens {args.max_tokens}, one request at a time, best of {args.rounds} "
                        f"per prompt, decode tokens/s (after the first token)")
    for column in ("prompts", "runtime", "method", "plain tok/s", "speculative tok/s", "speed-up", "identical", "top-2 logit gap where not",
                   "mean accepted", "acceptance by position"):
        table.add_column(column)
    threads = meta["session_options"]["threads"]
    for name, prompts in sets.items():
        for i, (method, speculative, draft_lm) in enumerate(methods):
            kiln = kiln_rows(lm, tokenizer, eos, prompts, args.max_tokens, args.rounds, speculative, draft_lm)
            table.add_row(f"{name} ({len(prompts)})" if i == 0 else "", "Kiln", method, f"{kiln['plain']:.1f}", f"{kiln['spec']:.1f}",
                          f"{kiln['spec'] / kiln['plain']:.2f}x", f"{kiln['same']}/{kiln['prompts']}",
                          " ".join(f"{m:.3f}" for m in sorted(kiln["margins"])), f"{kiln['drafts']['mean_accepted_length']:.2f}",
                          " ".join(f"{a:.2f}" for a in kiln["drafts"]["acceptance_by_position"]))
        if args.openvino_model:
            peer = openvino_rows(args.openvino_model, prompts, args.max_tokens, args.rounds, threads)
            table.add_row("", "OpenVINO GenAI", "prompt lookup", f"{peer['plain']:.1f}", f"{peer['lookup']:.1f}", f"{peer['lookup'] / peer['plain']:.2f}x",
                          f"{peer['same']}/{len(prompts)}", "", "", "")
    console.print(table)


if __name__ == "__main__":
    main()
