"""ONNX Runtime targets, `onnxruntime-cpu` and `onnxruntime-cuda` (CUDA execution provider): the
offline-optimized graph plus the session options and providers used, saved so every later load runs
exactly what was validated. ONNX Runtime's saved optimized graph is only valid with the execution
provider that optimized it, so each target optimizes with its own.

`build.graph: fused` (default) first rewrites the exported graph into the ONNX Runtime-specific
fused decoder (`modeling/decoder_graph.py`, `FusedOps`) from the exported graph's own tensors, then checks
that graph against the exported one on the same tokens with fp32 int4 compute (logits within
tolerance, identical greedy tokens) before ONNX Runtime optimizes it into the engine. `portable` optimizes the exported graph as it is.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.errors import StageFailed
from pipeline.memory import release_free_memory
from pipeline.modeling.runtime import (
    MATMULNBITS_ACCURACY_LEVEL,
    OPENVINO_MIN_TOKENS,
    FusedOrtCausalLM,
    OrtCausalLM,
    load_ort_engine,
    make_ort_session,
)

# CPU stays listed after CUDA: ONNX Runtime places shape arithmetic there whatever the device.
PROVIDERS = {"onnxruntime-cpu": ["CPUExecutionProvider"], "onnxruntime-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}

ENGINE_FILE = "engine.onnx"
PREFILL_FILE = "prefill.onnx"
BATCH_FILE = "batch.onnx"
# Fused vs exported graph, same weights: fp32 reordering noise only. Relative to the largest logit.
FUSION_RTOL = 1e-3
# How much further than the engine's own decode kernel another kernel may land from exact math:
# OpenVINO's prompts (dynamically quantized activations, bf16 where the CPU has it; measured 1-2 %
# on an fp32-compute SmolLM2 engine) and the batch graph (int8 weights requantized from the int4
# codes; measured 4.8 % on SmolLM2 text against the int8 decode kernel's 4.3 %) both round
# differently, within the int8 kernel's own 3-8 % on random prompts.
OPENVINO_PREFILL_RTOL = BATCH_KERNEL_RTOL = 0.05


def op_counts(model_file: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(model_file), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def exported_spec(exported):
    from pipeline.modeling.decoder import DecoderSpec

    return DecoderSpec.from_dict(exported.meta["decoder"])


def fused_graph_refusal(spec) -> str | None:
    """Why ONNX Runtime's CPU GroupQueryAttention cannot run this decoder, or None (both limits measured:
    "head_size shall be a multiple of 16", "cos_cache dimension 1 must be <= head_size / 2 and a multiple of 8")."""
    if spec.head_dim % 16:
        return (f"build.graph: fused needs head_dim divisible by 16 (ONNX Runtime's GroupQueryAttention on CPU); "
                f"this model has {spec.head_dim}; allowed for it: portable")
    if (spec.rotary_dim // 2) % 8:
        return (f"build.graph: fused needs half the rotary dimensions to be a multiple of 8 (ONNX Runtime's GroupQueryAttention); "
                f"this model rotates {spec.rotary_dim} of {spec.head_dim}; allowed for it: portable")
    return None


def write_fused_graph(exported, max_positions: int, out_file: Path) -> None:
    from pipeline.modeling.decoder_graph import fused_graph
    from pipeline.modeling.onnx_graph import ExternalData, save_streamed
    from pipeline.modeling.weights import OnnxWeights

    spec = exported_spec(exported)
    refusal = fused_graph_refusal(spec)
    if refusal:
        raise StageFailed("build", refusal)
    # tensor by tensor from the exported file into the fused one: neither graph's weights are held
    weights = OnnxWeights(spec, exported.model_file)
    scaling = exported.meta["rope_attention_scaling"]
    rope = {key: (weights.rope(key), scaling[key]) for key in sorted(set(spec.layer_rope))}
    with ExternalData(out_file) as external:
        model = fused_graph(spec, weights, rope, max_positions, external)
    save_streamed(model, out_file)


def decode_trace(reference, vocab: int, prompt_len: int = 24, steps: int = 8, batch: int = 2, seed: int = 0) -> dict[str, Any]:
    """Prefill a random prompt, then greedy-decode `steps` tokens: the prompt, the prefill's and
    every step's logits, and the tokens chosen, for `compare_to_trace` to feed another decoder."""
    ids = np.random.default_rng(seed).integers(0, vocab, size=(batch, prompt_len)).astype(np.int64)
    logits, state = reference.forward(ids, None)
    steps_logits, tokens = [logits], []
    for _ in range(steps):
        next_ids = logits[:, -1].argmax(-1)
        tokens.append(next_ids)
        logits, state = reference.forward(next_ids[:, None].astype(np.int64), state)
        steps_logits.append(logits)
    return {"ids": ids, "logits": steps_logits, "tokens": tokens}


def compare_to_trace(candidate, trace: dict[str, Any]) -> dict[str, Any]:
    """The candidate fed the reference's choices: the worst logits difference (relative to max
    |logit|) and whether every greedy token agreed."""
    logits, state = candidate.forward(trace["ids"], None)
    worst, same_tokens = 0.0, True
    for step, ref_logits in enumerate(trace["logits"]):
        worst = max(worst, float(np.abs(logits - ref_logits).max()) / float(np.abs(ref_logits).max()))
        same_tokens &= bool((logits[:, -1].argmax(-1) == ref_logits[:, -1].argmax(-1)).all())
        if step < len(trace["tokens"]):
            logits, state = candidate.forward(trace["tokens"][step][:, None].astype(np.int64), state)
    batch, prompt_len = trace["ids"].shape
    return {"max_rel_logit_diff": worst, "greedy_tokens_equal": same_tokens, "prompt_len": prompt_len,
            "decode_steps": len(trace["tokens"]), "batch": batch}


def compare_decoders(reference, candidate, vocab: int, prompt_len: int = 24, steps: int = 8, batch: int = 2, seed: int = 0) -> dict[str, Any]:
    """`compare_to_trace` of the candidate against the reference's own greedy trace."""
    return compare_to_trace(candidate, decode_trace(reference, vocab, prompt_len, steps, batch, seed))


def check_fusion(exported, fused_file: Path, max_positions: int, threads: int) -> dict[str, Any]:
    """The rewrite must compute what the exported graph computes. Judged with fp32 int4 compute on
    both sides: int8 activations (build.int4_compute: int8) round differently whenever inputs differ
    by one ulp, which would hide a real fusion error among rounding flips; validate measures that
    trade against the source instead. One session at a time: the reference's trace is recorded,
    its session dropped, then the fused graph is loaded."""
    trace = decode_trace(OrtCausalLM(make_ort_session(exported.model_file, threads=threads)), exported_spec(exported).vocab_size)
    release_free_memory()
    check = compare_to_trace(FusedOrtCausalLM(make_ort_session(fused_file, threads=threads), max_positions), trace)
    release_free_memory()
    if not check["greedy_tokens_equal"] or check["max_rel_logit_diff"] > FUSION_RTOL:
        raise StageFailed("build", f"the fused graph does not compute what the exported graph computes: {check} "
                                   f"(limit {FUSION_RTOL} relative); build.graph: portable skips the fusion")
    return check


def served_logits_error(candidate, trace: dict[str, Any], prompt_chunks: int) -> float:
    """The worst difference (relative to max |logit|) from the trace's logits where serving reads
    logits: the last position of each prompt chunk (each chunk after the last one's keys and
    values), then every decode step fed the trace's tokens."""
    errors, state, end = [], None, 0
    reference = trace["logits"][0]
    for chunk in np.array_split(trace["ids"], prompt_chunks, axis=1):
        logits, state = candidate.forward(chunk, state, last_only=True)
        end += chunk.shape[1]
        errors.append(np.abs(logits[:, -1] - reference[:, end - 1]).max() / np.abs(reference[:, end - 1]).max())
    for token, reference in zip(trace["tokens"], trace["logits"][1:]):
        logits, state = candidate.forward(token[:, None].astype(np.int64), state)
        errors.append(np.abs(logits - reference).max() / np.abs(reference).max())
    return float(max(errors))


def exact_math_trace(out_dir: Path, options: dict[str, Any], vocab: int, prompt_len: int, steps: int, batch: int) -> dict[str, Any]:
    """`decode_trace` of the built engine's graph with fp32 int4 compute (exact dequantized math)."""
    exact_file = out_dir / "exact-math-check.onnx"  # beside the engine: it reads the engine's weights file
    write_prefill_graph(out_dir / ENGINE_FILE, "fp32", exact_file)
    try:
        exact = FusedOrtCausalLM(make_ort_session(exact_file, threads=options["threads"], optimization="disable"),
                                 options["max_sequence_length"])
        return decode_trace(exact, vocab, prompt_len=prompt_len, steps=steps, batch=batch)
    finally:
        exact_file.unlink()


def check_openvino_prefill(out_dir: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Prompts on OpenVINO, and the decode steps that read their keys and values, against exact
    math (the engine's graph with fp32 int4 compute), in one chunk and in two: they may differ by
    OPENVINO_PREFILL_RTOL more than the engine's own decode kernel does on the same tokens (int8
    activations already differ by several per cent on random prompts, measured)."""
    lm = load_ort_engine(out_dir, {**options, "model_file": ENGINE_FILE})
    steps = 8
    prompt_len = min(3 * OPENVINO_MIN_TOKENS, options["max_sequence_length"] - steps)
    chunkings = (1, 2) if prompt_len >= 2 * OPENVINO_MIN_TOKENS else (1,)
    trace = exact_math_trace(out_dir, options, lm.vocab, prompt_len, steps, batch=1)
    kernel = max(served_logits_error(lm.without_prefill(), trace, chunks) for chunks in chunkings)
    openvino = max(served_logits_error(lm, trace, chunks) for chunks in chunkings)
    result = {"max_rel_logit_diff": openvino, "decode_kernel_max_rel_logit_diff": kernel, "prompt_len": prompt_len,
              "decode_steps": steps, "openvino_version": lm.openvino.version, "openvino_precision": lm.openvino.precision,
              "openvino_attention": lm.openvino.attention}
    if openvino > kernel + OPENVINO_PREFILL_RTOL:
        raise StageFailed("build", f"prompts on OpenVINO do not give the engine's logits: {result} (limit: the decode kernel's "
                                   f"difference + {OPENVINO_PREFILL_RTOL}); build.prefill_runtime: onnxruntime runs them on ONNX Runtime")
    return result


def step_logits_error(lm, trace: dict[str, Any], kernel: str) -> float:
    """The worst difference (relative to max |logit|) from the trace's logits over its decode steps
    run on `kernel`, fed the trace's tokens after a prompt on the decode kernel."""
    _, state = lm.forward(trace["ids"], None, kernel="decode")
    errors = []
    for token, reference in zip(trace["tokens"], trace["logits"][1:]):
        logits, state = lm.forward(token[:, None].astype(np.int64), state, kernel=kernel)
        errors.append(np.abs(logits - reference).max() / np.abs(reference).max())
    return float(max(errors))


# Rows of random prompts the batch check decodes: the worst step of 8 rows is noise (SmolLM2, five
# seeds: the batch graph 9.6/5.0/6.4/5.5/5.8 %, the decode kernel 3.3/11.2/7.1/4.2/5.7 %); over 32
# rows both worsts come from the same tail.
BATCH_CHECK_ROWS = 32


def check_batch_kernel(out_dir: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Decode steps of a batch of random prompts (at least `batch_min_rows` rows) on the batch graph
    against exact math: at most BATCH_KERNEL_RTOL further than the engine's own decode kernel on
    the same steps."""
    lm = load_ort_engine(out_dir, {**options, "model_file": ENGINE_FILE})
    steps, rows = 8, max(options["batch_min_rows"], BATCH_CHECK_ROWS)
    trace = exact_math_trace(out_dir, options, lm.vocab, min(24, options["max_sequence_length"] - steps), steps, batch=rows)
    result = {"max_rel_logit_diff": step_logits_error(lm, trace, "batch"),
              "decode_kernel_max_rel_logit_diff": step_logits_error(lm, trace, "decode"), "rows": rows, "decode_steps": steps}
    if result["max_rel_logit_diff"] > result["decode_kernel_max_rel_logit_diff"] + BATCH_KERNEL_RTOL:
        raise StageFailed("build", f"the batch kernel's decode steps do not give the engine's logits: {result} (limit: the decode "
                                   f"kernel's difference + {BATCH_KERNEL_RTOL}); build.batch_kernel: none decodes every step on the engine")
    return result


def write_prefill_graph(engine: Path, int4_compute: str, out_file: Path) -> None:
    """The optimized engine with its int4 matmuls set to another compute type, for prompts: only the
    graph file (kB) is new; it reads the engine's own weights file."""
    import onnx

    model = onnx.load(str(engine), load_external_data=False)
    level = MATMULNBITS_ACCURACY_LEVEL[int4_compute]
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = level
    onnx.save(model, str(out_file))


class OnnxRuntime:
    def __init__(self, name: str):
        self.name = name
        self.providers = PROVIDERS[name]

    def build(self, exported, out_dir: Path, cfg: Any, log: Callable[[str], None], shared_cache: Path | None = None) -> dict[str, Any]:
        import onnxruntime

        engine = out_dir / ENGINE_FILE
        options = {
            "providers": self.providers,
            "graph": cfg.graph,
            "max_sequence_length": cfg.max_sequence_length,
            "optimization_level": cfg.optimization_level,
            "int4_compute": cfg.int4_compute,
            "threads": cfg.threads or default_threads(),
        }
        check = None
        # inside the stage's own temporary folder, which the runner removes after a kill
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            graph_file = exported.model_file
            if cfg.graph == "fused":
                graph_file = Path(tmp) / "fused.onnx"
                write_fused_graph(exported, cfg.max_sequence_length, graph_file)
                check = check_fusion(exported, graph_file, cfg.max_sequence_length, options["threads"])
                log(f"fused vs exported graph (fp32 compute): max |Δlogits| {check['max_rel_logit_diff']:.1e} of max |logit|, "
                    f"greedy tokens {'equal' if check['greedy_tokens_equal'] else 'DIFFERENT'}")
            session = make_ort_session(graph_file, threads=options["threads"], optimization=cfg.optimization_level,
                                       int4_compute=cfg.int4_compute, optimized_output=engine, providers=self.providers)
            if session.get_providers()[0] != self.providers[0]:
                raise StageFailed("build", f"ONNX Runtime did not enable {self.providers[0]} (session providers: "
                                           f"{session.get_providers()})")
        if cfg.graph == "fused" and cfg.prefill_int4_compute != cfg.int4_compute:
            write_prefill_graph(engine, cfg.prefill_int4_compute, out_dir / PREFILL_FILE)
            options["prefill_model_file"] = PREFILL_FILE
            options["prefill_int4_compute"] = cfg.prefill_int4_compute
            log(f"prompts run with {cfg.prefill_int4_compute} int4 compute ({PREFILL_FILE}, the engine's weights), decode steps with {cfg.int4_compute}")
        if cfg.prefill_runtime == "openvino":
            options["prefill_runtime"] = "openvino"
            prefill_check = check_openvino_prefill(out_dir, {**options, "optimization_level": "disable"})
            log(f"prompts of {OPENVINO_MIN_TOKENS}+ tokens run on OpenVINO {prefill_check['openvino_version']} "
                f"({prefill_check['openvino_precision']} inference precision, attention: {prefill_check['openvino_attention']}): max |Δlogits| vs exact math "
                f"{prefill_check['max_rel_logit_diff']:.1e} of max |logit| (decode kernel alone: "
                f"{prefill_check['decode_kernel_max_rel_logit_diff']:.1e})")
        if cfg.batch_kernel == "int8_gemm":
            batch_check = self.build_batch_kernel(out_dir, options, cfg, log)
        elif cfg.batch_kernel == "openvino_paged":
            batch_check = self.build_openvino_batch(out_dir, options, cfg, log, prefill_check["openvino_attention"])
        counts = op_counts(engine)
        log(f"{cfg.graph} graph optimized: {sum(counts.values())} nodes, MatMulNBits {counts.get('MatMulNBits', 0)}, "
            f"GroupQueryAttention {counts.get('GroupQueryAttention', 0)}, DequantizeLinear left {counts.get('DequantizeLinear', 0)}")
        # Loading the saved graph again must not re-run the (hardware-specific) level-3 passes.
        load_options = {**options, "optimization_level": "disable"}
        (out_dir / "session_options.json").write_text(json.dumps(
            {"build": options, "load": load_options, "onnxruntime_version": onnxruntime.__version__}, indent=2))
        meta = {"model_file": ENGINE_FILE, "op_counts": counts, "session_options": load_options,
                "onnxruntime_version": onnxruntime.__version__}
        if check is not None:
            meta["fusion_check"] = check
        if cfg.prefill_runtime == "openvino":
            meta["openvino_prefill_check"] = prefill_check
        if cfg.batch_kernel != "none":
            meta["batch_kernel_check"] = batch_check
        if self.name == "onnxruntime-cuda":
            from pipeline.targets.gpu import device_facts

            meta["hardware"] = device_facts()
        return meta

    @staticmethod
    def build_batch_kernel(out_dir: Path, options: dict[str, Any], cfg: Any, log: Callable[[str], None]) -> dict[str, Any]:
        """`build.batch_kernel: int8_gemm`: the batch graph beside the engine, checked against exact math."""
        from pipeline.modeling.batch_graph import UnsupportedMatMul, write_batch_graph

        if not op_counts(out_dir / ENGINE_FILE).get("MatMulNBits"):
            raise StageFailed("build", "build.batch_kernel: int8_gemm rewrites the engine's int4 matmuls and this engine has none "
                                       "(nothing quantized to int4); allowed for it: none")
        try:
            rewritten = write_batch_graph(out_dir / ENGINE_FILE, out_dir / BATCH_FILE)
        except UnsupportedMatMul as e:
            raise StageFailed("build", f"build.batch_kernel: int8_gemm cannot rewrite this engine: {e}; allowed for it: none") from None
        options["batch_model_file"] = BATCH_FILE
        options["batch_min_rows"] = cfg.batch_kernel_min_rows
        check = check_batch_kernel(out_dir, {**options, "optimization_level": "disable"})
        log(f"decode steps of {cfg.batch_kernel_min_rows}+ rows run on {BATCH_FILE} ({rewritten} int4 matmuls as int8 GEMMs): "
            f"max |Δlogits| vs exact math {check['max_rel_logit_diff']:.1e} of max |logit| (decode kernel alone: "
            f"{check['decode_kernel_max_rel_logit_diff']:.1e})")
        return check

    @staticmethod
    def build_openvino_batch(out_dir: Path, options: dict[str, Any], cfg: Any, log: Callable[[str], None], attention: str) -> dict[str, Any]:
        """`build.batch_kernel: openvino_paged`: decode steps of many rows on OpenVINO's PagedAttention
        graph of the engine, checked against exact math. `attention`: what the prompt check found
        OpenVINO running (`check_openvino_prefill`)."""
        options["batch_kernel"] = "openvino_paged"
        options["batch_min_rows"] = cfg.batch_kernel_min_rows
        if attention != "PagedAttention":
            raise StageFailed("build", f"build.batch_kernel: openvino_paged needs this engine's attention as OpenVINO's PagedAttention; "
                                       f"its prompts run on {attention}; allowed for it: none, int8_gemm")
        check = check_batch_kernel(out_dir, {**options, "optimization_level": "disable"})
        log(f"decode steps of {cfg.batch_kernel_min_rows}+ rows run on OpenVINO's PagedAttention graph: max |Δlogits| vs exact math "
            f"{check['max_rel_logit_diff']:.1e} of max |logit| (decode kernel alone: {check['decode_kernel_max_rel_logit_diff']:.1e})")
        return check

    def load(self, engine_dir: Path, meta: dict[str, Any], threads: int | None = None):
        return load_ort_engine(engine_dir, {**meta["session_options"], "model_file": meta["model_file"]}, threads)
