"""Prompt processing (prefill) speed, engine alone: time to the first token of prompts of 64, 512
and 2,040 tokens (random ids; a 2,048-position engine leaves room for 8 more), and prefill tokens/s.

    .venv/bin/python benchmarks/prefill.py artifacts/cache/build/<key> [artifacts/cache/build/<key> ...] [--rounds 3] \
        [--genai-model artifacts/bench/genai-int4-cpu-<digest>] [--openvino-model artifacts/bench/openvino-int4-<digest>]

Every engine folder is measured as it serves prompts (`runtime.prompt_forward`: a fresh KV state,
logits at the last position only where the engine can, its prefill kernel where it has one) and,
for an engine with a separate prefill kernel (an ONNX Runtime prompt graph or OpenVINO), once more
with its decode kernel for prompts too, so the kernel's share shows. Engines alternate within each
round, in one process; the best round counts. Ratios are to the first column measured.

Peers, each in its own environment with the same prompts and threads, after the Kiln engines:
onnxruntime-genai's int4 model (benchmarks/decode.py makes it) and OpenVINO GenAI's LLMPipeline on
optimum-intel's int4 export (benchmarks/accuracy_peers.py makes it; prefix caching off). Each round
uses new prompts, so no runtime's prefix cache can answer one. llama.cpp is not a row:
llama-cpp-python 0.3.36 crashes (SIGSEGV in llama_decode) on Q4_0 and Q4_K_M files here as soon as
a prompt is evaluated more than one token per batch (n_batch 64 or 512, AMX machine).
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
from pipeline.modeling.runtime import prompt_forward
from pipeline.targets import get_target

LENGTHS = (64, 512, 2040)
HERE = Path(__file__).resolve().parent
BENCH = HERE.parent / "artifacts" / "bench"
PEERS = {  # row label: (environment's python, script, option holding the model folder)
    "onnxruntime-genai int4": (BENCH / "genai-venv" / "bin" / "python", "genai_peer.py", "genai_model"),
    "OpenVINO GenAI int4": (BENCH / "openvino-venv" / "bin" / "python", "openvino_peer.py", "openvino_model"),
}


def ttft_ms(lm, prompt: np.ndarray) -> float:
    started = time.perf_counter()
    logits, _ = prompt_forward(lm, prompt[None, :])
    int(logits[0, -1].argmax())
    return (time.perf_counter() - started) * 1e3


def engines_of(folders: list[Path]) -> list[tuple[str, object]]:
    engines = []
    for folder in folders:
        meta = read_manifest(folder)["meta"]
        opts = meta.get("session_options", {})
        lm = get_target(meta["target"]).load(folder, meta)
        label = f"{folder.name[:8]} {opts.get('graph', '')} {opts.get('int4_compute', '')}"
        if getattr(lm, "openvino", None) is not None:
            engines.append((f"{label}, prompts on OpenVINO ({lm.openvino.precision})", lm))
            engines.append((f"{label}, prompts {opts.get('int4_compute')} (decode kernel)", lm.without_prefill()))
        elif getattr(lm, "prefill_session", None) is not None:
            engines.append((f"{label}, prompts {opts.get('prefill_int4_compute')}", lm))
            engines.append((f"{label}, prompts {opts.get('int4_compute')} (decode kernel)", lm.without_prefill()))
        else:
            engines.append((label + ("" if getattr(lm, "selects_logits", True) else ", logits at every position"), lm))
    return engines


def peer_ttft(label: str, model: Path, prompts: dict[int, list[np.ndarray]], threads: int) -> dict[int, float]:
    """Best time to first token per length from a peer's own environment (the first prompt a warm-up)."""
    python, script, _ = PEERS[label]
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"threads": threads, "prompts": {n: [p.tolist() for p in ps] for n, ps in prompts.items()}}))
        proc = subprocess.run([str(python), str(HERE / script), "ttft", "--model", str(model), "--spec", str(spec)],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{proc.stderr[-3000:]}")
    return {int(n): ms for n, ms in json.loads(proc.stdout.strip().splitlines()[-1])["ttft_ms"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engines", type=Path, nargs="+", help="build stage folders")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--threads", type=int, default=2, help="the peers' threads (Kiln engines use their recorded ones)")
    for label, (_, _, option) in PEERS.items():
        parser.add_argument(f"--{option.replace('_', '-')}", type=Path, help=f"{label}'s model folder")
    args = parser.parse_args()
    engines = engines_of(args.engines)
    rng = np.random.default_rng(0)
    # a warm-up prompt, then a new prompt per round and length
    prompts = {n: [rng.integers(100, 20000, size=n).astype(np.int64) for _ in range(args.rounds + 1)] for n in args.lengths}
    for _, lm in engines:  # warm-up: first runs allocate and prepack
        ttft_ms(lm, prompts[min(args.lengths)][0])
    peers = [(label, getattr(args, option), python) for label, (python, _, option) in PEERS.items() if getattr(args, option)]
    for label, _, python in peers:
        if not python.is_file():
            raise SystemExit(f"{label}: no environment at {python} (see benchmarks/README.md)")
    best: dict[tuple[str, int], float] = {}
    # rounds interleave Kiln and the peers: this machine's speed drifts by tens of percent over
    # minutes, and measuring the peers only after every Kiln round gave them other minutes
    for round_ in range(1, args.rounds + 1):
        for name, lm in engines:
            for n, batch in prompts.items():
                ms = ttft_ms(lm, batch[round_])
                best[name, n] = min(ms, best.get((name, n), ms))
        for label, model, _ in peers:  # a new peer process per round: the warm-up prompt, then this round's
            round_prompts = {n: [batch[0], batch[round_]] for n, batch in prompts.items()}
            for n, ms in peer_ttft(label, model, round_prompts, args.threads).items():
                best[label, n] = min(ms, best.get((label, n), ms))
    names = [name for name, _ in engines] + [label for label, _, _ in peers]
    table = Table(title="Time to first token, engine alone (best of rounds)")
    table.add_column("engine")
    for n in args.lengths:
        table.add_column(f"{n} tok: ms", justify="right")
        table.add_column("tok/s", justify="right")
        table.add_column(f"vs {engines[0][0][:8]}", justify="right")
    for name in names:
        cells = []
        for n in args.lengths:
            ms = best[name, n]
            cells += [f"{ms:.0f}", f"{n / ms * 1e3:.0f}", f"{best[names[0], n] / ms:.2f}x"]
        table.add_row(name, *cells)
    Console(width=250).print(table)


if __name__ == "__main__":
    main()
