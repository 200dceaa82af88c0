"""llama.cpp as an accuracy peer: a GGUF file as llama.cpp's own tools write it, scored on the same
token windows as Kiln's validate stage. Runs in its own environment (llama-cpp-python), never
imports Kiln:

    bash benchmarks/setup_llamacpp_env.sh
    PY=artifacts/bench/llamacpp-venv/bin/python
    $PY benchmarks/llamacpp_peer.py quantize --gguf F32.gguf --out Q4_0.gguf --type q4_0
    $PY benchmarks/llamacpp_peer.py ppl --gguf FILE.gguf --spec S.json      # {"windows": [[ids]], "threads": 2}

`ppl` prints one JSON object: perplexity and the greedy next token at every scored position. The
F32 GGUF comes from llama.cpp's `convert_hf_to_gguf.py` (in the llama.cpp source that
llama-cpp-python's source distribution carries), run on Kiln's fp32 source checkpoint:
`benchmarks/accuracy_peers.py` does all of it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

QUANT_TYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 7, "q4_k_m": 15, "q5_0": 8, "q6_k": 18}  # llama_ftype values


def quantize(src: Path, out: Path, kind: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[kind]
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    if rc != 0:
        sys.exit(f"llama_model_quantize returned {rc}")


def perplexity(gguf: Path, windows: list[list[int]], threads: int) -> dict:
    from llama_cpp import Llama

    width = max(len(w) for w in windows)
    llm = Llama(model_path=str(gguf), n_ctx=width, n_batch=width, n_threads=threads, logits_all=True, verbose=False)
    nll, count, predictions = 0.0, 0, []
    for window in windows:
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        targets = np.asarray(window[1:])
        nll -= float(logp[np.arange(len(targets)), targets].sum())
        count += len(targets)
        predictions += logits.argmax(axis=-1).tolist()
    return {"ppl": math.exp(nll / count), "tokens": count, "predictions": predictions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("--gguf", type=Path, required=True)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--type", choices=sorted(QUANT_TYPES), default="q4_0")
    p = sub.add_parser("ppl")
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--spec", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "quantize":
        quantize(args.gguf, args.out, args.type)
    else:
        spec = json.loads(args.spec.read_text())
        print(json.dumps(perplexity(args.gguf, spec["windows"], spec.get("threads", 2))))


if __name__ == "__main__":
    main()
