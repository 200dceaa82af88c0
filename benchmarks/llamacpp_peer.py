"""llama.cpp as an accuracy peer: a GGUF file as llama.cpp's own tools write it, scored on the same
token windows as Kiln's validate stage. Runs in its own environment (llama-cpp-python), never
imports Kiln:

    bash benchmarks/setup_llamacpp_env.sh
    PY=artifacts/bench/llamacpp-venv/bin/python
    $PY benchmarks/llamacpp_peer.py quantize --gguf F32.gguf --out Q4_0.gguf --type q4_0
    $PY benchmarks/llamacpp_peer.py ppl --gguf FILE.gguf --spec S.json      # {"windows": [[ids]], "threads": 2}
    $PY benchmarks/llamacpp_peer.py tokenize --gguf FILE.gguf --text-file T.txt   # llama.cpp's token ids (JSON)

`ppl` prints one JSON object: perplexity and the greedy next token at every scored position.
`benchmarks/accuracy_peers.py` makes the files (llama.cpp's own quantizer, from the source GGUF
file or from llama.cpp's `convert_hf_to_gguf.py` output) and runs this script.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from window_scores import WindowScores

QUANT_TYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 7, "q4_k_m": 15, "q5_0": 8, "q6_k": 18}  # llama_ftype values


def quantize(src: Path, out: Path, kind: str, requantize: bool) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[kind]
    params.nthread = 2
    params.allow_requantize = requantize  # from a quantized file: llama.cpp dequantizes to f32 first
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    if rc != 0:
        sys.exit(f"llama_model_quantize returned {rc}")


def perplexity(gguf: Path, windows: list[list[int]], threads: int) -> dict:
    from llama_cpp import Llama

    width = max(len(w) for w in windows)
    # n_batch 1: one token per decode call. With more (64 or the whole window), llama-cpp-python
    # 0.3.36 crashed (SIGSEGV in llama_decode) on Q4_0 and Q4_K_M files on this AMX machine; F32 did not.
    llm = Llama(model_path=str(gguf), n_ctx=width, n_batch=1, n_threads=threads, logits_all=True, verbose=False)
    scores = WindowScores()
    for window in windows:
        llm.reset()
        llm.eval(window)
        scores.add(llm.scores, window)
    return scores.result()


def tokenize(gguf: Path, text: str) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=16, verbose=False)  # (vocab_only=True aborted: unordered_map::at)
    return llm.tokenize(text.encode(), add_bos=False, special=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("--gguf", type=Path, required=True)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--type", choices=sorted(QUANT_TYPES), default="q4_0")
    q.add_argument("--allow-requantize", action="store_true")
    t = sub.add_parser("tokenize")
    t.add_argument("--gguf", type=Path, required=True)
    t.add_argument("--text-file", type=Path, required=True)
    p = sub.add_parser("ppl")
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--spec", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "quantize":
        quantize(args.gguf, args.out, args.type, args.allow_requantize)
    elif args.command == "tokenize":
        print(json.dumps(tokenize(args.gguf, args.text_file.read_text())))
    else:
        spec = json.loads(args.spec.read_text())
        print(json.dumps(perplexity(args.gguf, spec["windows"], spec.get("threads", 2))))


if __name__ == "__main__":
    main()
