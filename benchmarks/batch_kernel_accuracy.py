"""How far an engine's kernels land from exact math on real text, decode steps of many rows at once:
the engine's own decode kernel and, for a build with `build.batch_kernel: int8_gemm`, its batch
graph (which serving uses for steps of `batch_min_rows`+ rows).

    .venv/bin/python benchmarks/batch_kernel_accuracy.py artifacts/cache/build/<key> [--rows 8] [--steps 24]

Exact math is the engine's own graph with fp32 int4 compute (the dequantized weights, as the build's
checks use). `--rows` prompts of Python's documentation (`pydoc_data`, 40 to 300 tokens) are
prefilled together on the decode kernel, then exact math decodes them greedily; each kernel is fed
the same tokens (teacher forcing) and compared at every step: the largest and median difference
relative to the step's largest logit, and how often its top token is exact math's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline.artifacts import read_manifest
from pipeline.modeling.runtime import FusedOrtCausalLM, make_ort_session
from pipeline.targets import get_target
from pipeline.targets.onnxruntime_ep import ENGINE_FILE, write_prefill_graph


def text_prompts(tokenizer_file: Path, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """`rows` right-padded prompts of 40-300 tokens from pydoc_data's topics, and their lengths."""
    import pydoc_data.topics

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    texts = [t for t in pydoc_data.topics.topics.values() if len(t) > 2000]
    lengths = np.linspace(40, 300, rows).astype(int)
    ids = np.zeros((rows, lengths.max()), dtype=np.int64)
    for row, length in enumerate(lengths):
        ids[row, :length] = tokenizer.encode(texts[row * 3 % len(texts)]).ids[:length]
    return ids, lengths


def exact_engine(build: Path, folder: Path, max_sequence_length: int) -> FusedOrtCausalLM:
    """The engine's graph with fp32 int4 compute, in `folder` beside a link to the engine's weights."""
    for name in (ENGINE_FILE, ENGINE_FILE + ".data"):
        try:
            os.link(build / name, folder / name)
        except OSError:  # another file system
            shutil.copy2(build / name, folder / name)
    write_prefill_graph(folder / ENGINE_FILE, "fp32", folder / "exact.onnx")
    return FusedOrtCausalLM(make_ort_session(folder / "exact.onnx", optimization="disable"), max_sequence_length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build", type=Path, help="a fused onnxruntime-cpu build stage folder")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    meta = read_manifest(args.build)["meta"]
    lm = get_target("onnxruntime-cpu").load(args.build, meta)
    if not isinstance(lm, FusedOrtCausalLM):
        raise SystemExit("a fused-graph build (build.graph: fused) is needed")
    ids, lengths = text_prompts(args.build / "tokenizer.json", args.rows)
    with tempfile.TemporaryDirectory(dir=args.build.parent) as tmp:
        exact = exact_engine(args.build, Path(tmp), lm.max_sequence_length)
        logits, state = exact.forward(ids, None, lengths, last_only=True)
        reference, tokens = [logits[:, -1]], []
        for _ in range(args.steps):
            tokens.append(reference[-1].argmax(-1))
            logits, state = exact.forward(tokens[-1][:, None], state)
            reference.append(logits[:, -1])
        del exact
    kernels = ["decode"] + (["batch"] if lm.batch_session is not None else [])
    table = Table(title=f"{args.rows} rows of pydoc text (40-300 tokens), {args.steps} teacher-forced decode steps, against exact math")
    for column in ("kernel", "max |Δlogits| / max |logit|", "median", "top-1 = exact's"):
        table.add_column(column, justify="right")
    for kernel in kernels:
        _, state = lm.forward(ids, None, lengths, last_only=True, kernel="decode")
        errors, agree = [], 0
        for step, token in enumerate(tokens):
            logits, state = lm.forward(token[:, None], state, kernel=kernel)
            got, want = logits[:, -1], reference[step + 1]
            errors += list(np.abs(got - want).max(-1) / np.abs(want).max(-1))
            agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        table.add_row(kernel + (f" ({meta['session_options'].get('batch_model_file')})" if kernel == "batch" else " (engine.onnx)"),
                      f"{max(errors):.4f}", f"{np.median(errors):.4f}", f"{agree}/{len(errors)}")
    Console().print(table)


if __name__ == "__main__":
    main()
