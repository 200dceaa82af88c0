"""`tensorrt` target: a serialized TensorRT engine (`engine.plan`) built from Kiln's opset-21 ONNX
with TensorRT's Python API (`Builder`, `OnnxParser`, `BuilderConfig`), and a runtime that drives it.

- The graph TensorRT parses is written by `modeling/tensorrt_graph`: zero points folded into a
  small exact correction matmul (TensorRT's DequantizeLayer takes none), and the precision
  written into the graph (strongly typed network; TensorRT 11 dropped the fp16 builder flag). The
  int4 weights reach TensorRT as blocked signed-int4 `DequantizeLinear`, run as weight-only int4.
- One optimization profile covers prefill and decode: batch, new tokens per call and past KV
  length ranges come from `build.tensorrt`.
- The timing cache is kept per GPU model and TensorRT version under the artifacts cache, so a
  rebuild after a recipe change reuses the measured tactics.
- `engine_meta.json` records the TensorRT version, GPU, compute capability, driver, CUDA runtime,
  build settings and the ONNX sha256; `load` compares it with this machine before deserializing.
- After building, the engine is checked against the exported graph on ONNX Runtime CPU (same
  tokens, logits within the precision's tolerance), as the fused CPU graph is.

Nothing in this module has run on a GPU in this repository's CI; docs/gpu.md says what was verified where.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import EngineMismatch, StageFailed
from pipeline.hashing import sha256_file
from pipeline.modeling.runtime import MissingRuntime, OrtCausalLM, load_tensorrt_engine, make_ort_session
from pipeline.modeling.tensorrt_graph import TENSORRT_DOC, has_zero_point, tensorrt_unsupported, write_tensorrt_graph
from pipeline.targets.gpu import check_engine_compatible, device_facts

PLAN_FILE = "engine.plan"
META_FILE = "engine_meta.json"
BUILD_LOG = "tensorrt_build.log"
# Engine vs exported graph (ONNX Runtime CPU, fp32), relative to the largest logit. fp32 allows for
# TF32 matmuls, which TensorRT enables by default on Ampere and later.
CHECK_RTOL = {"fp32": 5e-3, "fp16": 3e-2}


def graph_inputs(model_file: Path) -> dict[str, tuple[int | None, ...]]:
    """Input name -> dims (None where the axis is dynamic) of an ONNX graph, without loading weights."""
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    return {i.name: tuple(d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim)
            for i in graph.input}


def profile_shapes(inputs: dict[str, tuple[int | None, ...]], trt_cfg) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape of every input for one optimization profile, from the recipe's ranges."""
    batch, new, past = trt_cfg.batch, trt_cfg.new_tokens, trt_cfg.past_tokens
    points = ("min", "opt", "max")
    shapes = {}
    for name, dims in inputs.items():
        if name in ("input_ids", "position_ids"):
            shapes[name] = tuple((getattr(batch, p), getattr(new, p)) for p in points)
        elif name == "attention_mask":  # covers past + new positions
            shapes[name] = tuple((getattr(batch, p), getattr(past, p) + getattr(new, p)) for p in points)
        elif name.startswith("past_key_values.") and len(dims) == 4 and None not in (dims[1], dims[3]):
            shapes[name] = tuple((getattr(batch, p), dims[1], getattr(past, p), dims[3]) for p in points)
        else:
            raise StageFailed("build", f"input {name!r} {dims} is not one of a Kiln decoder's inputs; "
                                       "cannot give TensorRT an optimization profile for it")
    return shapes


def zero_point_layers(model_file: Path) -> list[str]:
    """DequantizeLinear nodes that carry a zero point (TensorRT accepts none)."""
    import onnx

    return [n.name for n in onnx.load(str(model_file), load_external_data=False).graph.node if has_zero_point(n)]


def timing_cache_name(hardware: dict[str, Any]) -> str:
    gpu = "".join(c if c.isalnum() else "-" for c in hardware["gpu_name"])
    return f"{gpu}-sm{hardware['compute_capability'].replace('.', '')}-trt{hardware.get('tensorrt_version')}.timing"


def capturing_logger(echo: Callable[[str], None]):
    """A TensorRT logger that keeps every line for the build log and echoes warnings and errors."""
    import tensorrt as trt

    loud = (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR, trt.ILogger.Severity.WARNING)

    class CapturingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)  # TensorRT's documented way to subclass its logger
            self.lines: list[str] = []

        def log(self, severity, msg):
            line = f"[{severity.name}] {msg}"
            self.lines.append(line)
            if severity in loud:
                echo(f"TensorRT {line}")

    return CapturingLogger()


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


class TensorRt:
    name = "tensorrt"

    def build(self, exported, out_dir: Path, cfg: Any, log: Callable[[str], None], shared_cache: Path | None = None) -> dict[str, Any]:
        import onnx
        import tensorrt as trt

        trt_cfg = cfg.tensorrt
        hardware = device_facts()
        logger = capturing_logger(log)
        shapes = profile_shapes(graph_inputs(exported.model_file), trt_cfg)
        # inside the stage's own temporary folder, which the runner removes after a kill
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            graph_file = Path(tmp) / "tensorrt_input.onnx"
            folded = write_tensorrt_graph(exported.model_file, trt_cfg.precision, graph_file)
            left = zero_point_layers(graph_file)
            if left:
                raise StageFailed("build", f"zero points left after folding: {left[:3]}")
            undocumented = tensorrt_unsupported(onnx.load(str(graph_file), load_external_data=False))
            if undocumented:
                raise StageFailed("build", f"{len(undocumented)} nodes use what {TENSORRT_DOC} does not document: "
                                           + "; ".join(undocumented[:5]))
            log(f"TensorRT input graph: {trt_cfg.precision}, zero points folded in {folded} layers")
            builder = trt.Builder(logger)
            network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
            parser = trt.OnnxParser(network, logger)
            if not parser.parse_from_file(str(graph_file)):
                errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
                raise StageFailed("build", "TensorRT's ONNX parser refused the graph:\n  " + "\n  ".join(errors[:10]))
            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(trt_cfg.workspace_gib * 2**30))
            config.builder_optimization_level = trt_cfg.builder_optimization_level
            profile = builder.create_optimization_profile()
            for name, (low, opt, high) in shapes.items():
                profile.set_shape(name, low, opt, high)
            config.add_optimization_profile(profile)
            cache_file = None
            if trt_cfg.timing_cache and shared_cache is not None:
                shared_cache.mkdir(parents=True, exist_ok=True)
                cache_file = shared_cache / timing_cache_name(hardware)
                blob = cache_file.read_bytes() if cache_file.is_file() else b""
                log(f"timing cache {cache_file} ({'reused, ' + str(len(blob)) + ' bytes' if blob else 'new'})")
                config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=False)
            started = time.perf_counter()
            plan = builder.build_serialized_network(network, config)
            build_s = time.perf_counter() - started
            (out_dir / BUILD_LOG).write_text("\n".join(logger.lines) + "\n")
            if plan is None:
                raise StageFailed("build", f"TensorRT could not build the engine (log: {out_dir / BUILD_LOG}); last lines:\n  "
                                           + "\n  ".join(logger.lines[-10:]))
            (out_dir / PLAN_FILE).write_bytes(bytes(plan))
            if cache_file is not None:
                write_atomic(cache_file, bytes(config.get_timing_cache().serialize()))
        log(f"TensorRT {trt.__version__} engine built in {build_s:.1f} s on {hardware['gpu_name']} ({trt_cfg.precision})")
        meta = {
            "model_file": PLAN_FILE,
            "hardware": hardware,
            "onnx_sha256": sha256_file(exported.model_file),
            "build_settings": {**trt_cfg.model_dump(mode="json"), "max_sequence_length": cfg.max_sequence_length,
                               "strongly_typed": True, "profile_shapes": {k: [list(s) for s in v] for k, v in shapes.items()}},
            "build_seconds": round(build_s, 2),
        }
        (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
        check = self.check_against_exported(exported, out_dir, meta, trt_cfg.precision)
        log(f"engine vs exported graph: max |Δlogits| {check['max_rel_logit_diff']:.1e} of max |logit|, "
            f"greedy tokens {'equal' if check['greedy_tokens_equal'] else 'different'}")
        return {**meta, "engine_check": check}

    def check_against_exported(self, exported, engine_dir: Path, meta: dict[str, Any], precision: str) -> dict[str, Any]:
        from pipeline.targets.onnxruntime_ep import compare_decoders

        reference = OrtCausalLM(make_ort_session(exported.model_file))
        check = compare_decoders(reference, self.load(engine_dir, meta), exported.meta["decoder"]["vocab_size"])
        if check["max_rel_logit_diff"] > CHECK_RTOL[precision]:
            raise StageFailed("build", f"the TensorRT engine does not compute what the exported graph computes: {check} "
                                       f"(limit {CHECK_RTOL[precision]} relative at {precision})")
        return check

    def load(self, engine_dir: Path, meta: dict[str, Any], threads: int | None = None):
        engine_dir = Path(engine_dir)
        check_engine_compatible(meta["hardware"], device_facts(), f"the TensorRT engine in {engine_dir}")
        try:
            return load_tensorrt_engine(engine_dir / PLAN_FILE)
        except MissingRuntime as e:
            raise EngineMismatch(str(e)) from None
