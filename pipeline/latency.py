"""Latency and peak memory of one model, timed through Kiln's decode engine (`pipeline.engine`,
the scheduler the Triton and MLflow models run) and measured in a child process of its own so that peak RSS
is that model's, not the validating process's (which also holds the PyTorch reference).

    python -m pipeline.latency --spec spec.json   (prints one JSON object)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import StageFailed
from pipeline.memory import peak_rss_mb
from pipeline.metrics import LatencySummary
from pipeline.processes import die_with_parent


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    prompt = np.asarray(spec["prompt_ids"], dtype=np.int64)
    if spec["backend"] == "engine":
        from pipeline.targets import get_target

        lm = get_target(spec["target"]).load(Path(spec["engine_dir"]), spec["engine_meta"], threads=spec.get("threads"))
    else:
        import torch

        from pipeline.modeling.hf import load_causal_lm
        from pipeline.modeling.runtime import TorchCausalLM

        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        lm = TorchCausalLM(load_causal_lm(Path(spec["model_dir"]), spec.get("dtype", "float32")))
    from tokenizers import Tokenizer

    from pipeline.engine import DraftStats, timed_greedy

    # the loop serving runs (kiln_engine.Scheduler, one row), detokenizing included; with
    # `speculative` (the package's settings) its speculative decoding
    options = {"speculative": spec["speculative"]} if spec.get("speculative") else {}
    if options and spec["speculative"]["method"] == "draft":  # checked by validate (draft_engine.checked_draft)
        from pipeline.modeling.runtime import load_draft_engine

        options["draft_lm"] = load_draft_engine(spec["speculative"], "/", threads=spec.get("threads"))
    drafts = DraftStats()
    tokenizer = Tokenizer.from_file(spec.get("tokenizer_file") or str(Path(spec.get("engine_dir") or spec["model_dir"]) / "tokenizer.json"))
    for _ in range(spec["warmup"]):
        timed_greedy(lm, tokenizer, prompt, spec["new_tokens"], time.perf_counter, **options)
    ttfts, steps, tokens = [], [], []
    for _ in range(spec["repeats"]):
        tokens, ttft, step_times = timed_greedy(lm, tokenizer, prompt, spec["new_tokens"], time.perf_counter, drafts, **options)
        ttfts.append(ttft)
        steps.append(step_times)
    summary = LatencySummary.from_runs(ttfts, steps)
    extra = {"drafts": drafts.as_dict()} if options else {}
    if spec["backend"] == "engine" and spec["engine_meta"].get("hardware"):
        from pipeline.targets.gpu import process_gpu_memory_mb

        extra["gpu_memory_mb"] = process_gpu_memory_mb()
    return {
        **summary.__dict__,
        **extra,
        "peak_rss_mb": peak_rss_mb(),
        "decode_ms": [round(t * 1e3, 4) for run in steps for t in run],  # every decode step, for the report's plot
        "generated_ids": tokens,
    }


def measure_in_subprocess(spec: dict[str, Any], work_dir: Path, label: str) -> dict[str, Any]:
    spec_file = work_dir / f"latency_{label}_spec.json"
    spec_file.write_text(json.dumps(spec))
    # a killed `kiln run` must not leave a latency run behind
    proc = subprocess.run([sys.executable, "-m", "pipeline.latency", "--spec", str(spec_file)],
                          capture_output=True, text=True, preexec_fn=die_with_parent)
    spec_file.unlink()
    if proc.returncode != 0:
        raise StageFailed("validate", f"latency measurement of {label} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, type=Path)
    args = parser.parse_args()
    print(json.dumps(measure(json.loads(args.spec.read_text()))))


if __name__ == "__main__":
    main()
