"""Where a built engine's decode time goes: ONNX Runtime's profiler per operator type, the share of a
decode step spent outside `run_with_iobinding` (Python), and this machine's streaming read bandwidth.

    .venv/bin/python benchmarks/profile_engine.py artifacts/cache/build/<key> --new-tokens 32

The profiled run includes a 64-token prefill; op shares are of all profiled model runs.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline.artifacts import read_manifest
from pipeline.modeling.runtime import FusedOrtCausalLM, OrtCausalLM, greedy_decode
from pipeline.targets import get_target


def profiled_lm(engine_dir: Path, meta: dict, prefix: str):
    import onnxruntime as ort

    opts = meta["session_options"]
    so = ort.SessionOptions()
    so.enable_profiling, so.profile_file_prefix = True, prefix
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the engine is already optimized
    so.intra_op_num_threads = opts["threads"]
    session = ort.InferenceSession(str(engine_dir / meta["model_file"]), so, providers=["CPUExecutionProvider"])
    lm = FusedOrtCausalLM(session, opts["max_sequence_length"]) if opts.get("graph") == "fused" else OrtCausalLM(session)
    return session, lm


def python_share(lm, prompt: np.ndarray, steps: int) -> tuple[float, float]:
    """Median decode step and median time inside the session run (ms)."""
    session, inner = lm.session, []
    for name in ("run_with_iobinding", "run"):
        original = getattr(session, name)

        def timed(*a, original=original, **k):
            t = time.perf_counter()
            out = original(*a, **k)
            inner.append(time.perf_counter() - t)
            return out

        setattr(session, name, timed)
    _, _, step_times = greedy_decode(lm, prompt, steps, time.perf_counter)
    return float(np.median(step_times)) * 1e3, float(np.median(inner[1:])) * 1e3


def read_bandwidth_gb_s(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(50_000_000)  # 200 MB, far beyond any cache
    best = min(_timed(x.sum) for _ in range(3))
    return 0.2 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine_dir", type=Path)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    console = Console()
    meta = read_manifest(args.engine_dir)["meta"]
    prompt = np.arange(100, 164, dtype=np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        session, lm = profiled_lm(args.engine_dir, meta, str(Path(tmp) / "profile"))
        greedy_decode(lm, prompt, args.new_tokens, time.perf_counter)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    total = sum(e["dur"] for e in events if e.get("name") == "model_run")
    table = Table(title=f"{args.engine_dir.name}: {meta['session_options'].get('graph', 'portable')} graph, "
                        f"int4 compute {meta['session_options']['int4_compute']}, 64-token prefill + {args.new_tokens - 1} decode steps")
    for col in ("operator", "ms", "share of model time"):
        table.add_column(col, justify="left" if col == "operator" else "right")
    for op, dur in per_op.most_common(12):
        table.add_row(op, f"{dur / 1e3:.1f}", f"{100 * dur / total:.1f} %")
    console.print(table)
    lm = get_target(meta["target"]).load(args.engine_dir, meta)  # unprofiled, as validate loads it
    greedy_decode(lm, prompt, 4, time.perf_counter)  # warm-up
    step, inside = python_share(lm, prompt, args.new_tokens)
    console.print(f"decode step p50 {step:.2f} ms, of which inside ONNX Runtime {inside:.2f} ms (Python around it: {step - inside:.2f} ms)")
    console.print(f"streaming read bandwidth with {meta['session_options']['threads']} threads: "
                  f"{read_bandwidth_gb_s(meta['session_options']['threads']):.1f} GB/s")


if __name__ == "__main__":
    main()
