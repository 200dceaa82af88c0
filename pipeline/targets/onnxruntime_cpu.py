"""ONNX Runtime on CPU: the offline-optimized graph (DequantizeLinear+MatMul fused into MatMulNBits)
plus the session options used, saved so every later load runs exactly what was validated."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from pipeline.modeling.runtime import OrtCausalLM, make_ort_session

ENGINE_FILE = "engine.onnx"


def op_counts(model_file: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(model_file), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class OnnxRuntimeCpu:
    name = "onnxruntime-cpu"

    def build(self, onnx_file: Path, out_dir: Path, cfg: Any, log: Callable[[str], None]) -> dict[str, Any]:
        import onnxruntime

        engine = out_dir / ENGINE_FILE
        options = {
            "optimization_level": cfg.optimization_level,
            "int4_compute": cfg.int4_compute,
            "threads": cfg.threads or default_threads(),
        }
        make_ort_session(onnx_file, threads=options["threads"], optimization=cfg.optimization_level,
                         int4_compute=cfg.int4_compute, optimized_output=engine)
        counts = op_counts(engine)
        log(f"optimized graph: {sum(counts.values())} nodes, MatMulNBits {counts.get('MatMulNBits', 0)}, "
            f"DequantizeLinear left {counts.get('DequantizeLinear', 0)}")
        # Loading the saved graph again must not re-run the (hardware-specific) level-3 passes.
        load_options = {**options, "optimization_level": "disable"}
        (out_dir / "session_options.json").write_text(json.dumps(
            {"build": options, "load": load_options, "providers": ["CPUExecutionProvider"],
             "onnxruntime_version": onnxruntime.__version__}, indent=2))
        return {"model_file": ENGINE_FILE, "op_counts": counts, "session_options": load_options,
                "onnxruntime_version": onnxruntime.__version__}

    def load(self, engine_dir: Path, meta: dict[str, Any], threads: int | None = None) -> OrtCausalLM:
        opts = meta["session_options"]
        return OrtCausalLM(make_ort_session(engine_dir / meta["model_file"], threads=threads or opts["threads"],
                                            optimization=opts["optimization_level"], int4_compute=opts["int4_compute"]))
