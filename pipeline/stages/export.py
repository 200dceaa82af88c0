"""export: the source checkpoint + the quantizer's codes -> ONNX (opset 21) with KV cache, verified.

Kiln writes the graph itself (`modeling/decoder_graph.py`, from the checkpoint's `DecoderSpec`);
docs/decisions.md records the measurement behind that choice. After writing, every output (logits and each present key/value) is compared
with PyTorch running the same dequantized weights, at shapes unlike any the writer assumed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from pipeline.artifacts import OnnxModel, QuantizedWeights, SourceCheckpoint, write_json_atomic
from pipeline.errors import KilnError
from pipeline.modeling.decoder import DecoderSpec, describe, hf_config, rotary_tables
from pipeline.modeling.decoder_graph import portable_graph
from pipeline.modeling.hf import SafetensorsWeights, read_config
from pipeline.modeling.onnx_graph import ExternalData, save_streamed
from pipeline.modeling.runtime import DecodeState, OrtCausalLM, make_ort_session
from pipeline.modeling.weights import CheckpointWeights
from pipeline.quantization.format import QuantizedLinear, load_quantized
from pipeline.quantization.reference import load_overrides, quantized_reference
from pipeline.recipe import ExportConfig, ExportVerifyConfig
from pipeline.runner import StageContext

MODEL_FILE = "model.onnx"
# Files a runtime needs beside the graph: tokenizer and generation settings.
RUNTIME_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja")


class ExportMismatch(KilnError):
    exit_code = 3


def write_onnx(source: SourceCheckpoint, quantized: dict[str, QuantizedLinear], overrides: Path | None, out_file: Path) -> dict:
    import onnx

    config = hf_config(read_config(source.model_dir), str(source.model_dir / "config.json"))
    spec = describe(config)
    rope = rotary_tables(config, spec)
    weights = CheckpointWeights(spec, SafetensorsWeights(source.model_dir, overrides), quantized)
    # Each initializer goes to model.onnx.data as the writer makes it: one layer's tensors in memory.
    with ExternalData(out_file) as external:
        model = portable_graph(spec, weights, rope, external)
    save_streamed(model, out_file)
    onnx.checker.check_model(str(out_file))
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"nodes": len(model.graph.node), "op_counts": ops, "decoder": spec.to_dict(),
            "rope_attention_scaling": {key: scaling for key, (_, scaling) in rope.items()}}


def reference_model(source: SourceCheckpoint, quantized: dict[str, QuantizedLinear], overrides: Path | None = None):
    return quantized_reference(source.model_dir, quantized, load_overrides(overrides))


def verification_inputs(shape, v: ExportVerifyConfig) -> tuple[list[np.ndarray], np.ndarray]:
    """A random prefix cache and new tokens, the same for both sides."""
    rng = np.random.default_rng(v.seed)
    past = [rng.standard_normal((v.batch, shape.num_kv_heads, v.past_len, shape.head_dim)).astype(np.float32)
            for _ in range(2 * shape.num_layers)]
    ids = rng.integers(0, shape.vocab_size, size=(v.batch, v.seq_len)).astype(np.int64)
    return past, ids


def onnx_outputs(onnx_file: Path, shape, v: ExportVerifyConfig) -> dict[str, np.ndarray]:
    past, ids = verification_inputs(shape, v)
    # The graph as written (no rewrites), each weight dequantized only when its MatMul runs.
    lm = OrtCausalLM(make_ort_session(onnx_file, optimization="disable", dequantize_in_order=True))
    logits, state = lm.forward(ids, DecodeState(past, v.past_len))
    got = {"logits": logits}
    for i in range(shape.num_layers):
        got[f"present.{i}.key"], got[f"present.{i}.value"] = state.cache[2 * i], state.cache[2 * i + 1]
    return got


def torch_outputs(torch_model, shape, v: ExportVerifyConfig) -> dict[str, np.ndarray]:
    import torch
    from transformers import DynamicCache

    past, ids = verification_inputs(shape, v)
    # Every layer keeps its whole past here (a sliding layer's cache in transformers keeps only the
    # window, which the mask makes equivalent), so each present output can be compared whole.
    cache = DynamicCache()
    for i in range(shape.num_layers):
        cache.update(torch.from_numpy(past[2 * i]), torch.from_numpy(past[2 * i + 1]), i)
    total = v.past_len + v.seq_len
    with torch.inference_mode():
        out = torch_model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.ones((v.batch, total), dtype=torch.long),
            position_ids=torch.arange(v.past_len, total).expand(v.batch, v.seq_len),
            past_key_values=cache,
            use_cache=True,
        )
    ref = {"logits": out.logits.numpy()}
    for i, layer in enumerate(out.past_key_values.layers):
        ref[f"present.{i}.key"], ref[f"present.{i}.value"] = layer.keys.numpy(), layer.values.numpy()
    return ref


def compare_outputs(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], v: ExportVerifyConfig) -> list[dict]:
    results = []
    for name, expected in ref.items():
        actual = got[name]
        same_shape = actual.shape == expected.shape
        diff = float(np.abs(actual - expected).max()) if same_shape else float("inf")
        # Scale-aware: fp32 reordering noise grows with depth and with the output's magnitude, so an
        # output passes when max|Δ| <= atol + rtol * max|ref| (elementwise allclose would judge
        # 1e-3 noise on logits of magnitude 30 against the few logits that happen to be near 0).
        limit = v.atol + v.rtol * float(np.abs(expected).max())
        ok = same_shape and diff <= limit
        results.append({"output": name, "shape": list(actual.shape), "expected_shape": list(expected.shape),
                        "max_abs_diff": diff, "limit": limit, "passed": ok})
    return results


def verify_against_torch(onnx_file: Path, torch_model, v: ExportVerifyConfig) -> list[dict]:
    """Run both on the same random prefix cache + new tokens; compare every output."""
    shape = describe(torch_model.config)
    return compare_outputs(torch_outputs(torch_model, shape, v), onnx_outputs(onnx_file, shape, v), v)


def run(cfg: ExportConfig, source: SourceCheckpoint, quantized: QuantizedWeights, *, ctx: StageContext) -> OnnxModel:
    layers = load_quantized(quantized.tensors_file)
    overrides = quantized.overrides_file if quantized.overrides_file.is_file() else None
    out_file = ctx.out_dir / MODEL_FILE
    ctx.log(f"writing ONNX opset {cfg.opset} ({len(layers)} int{quantized.meta.get('bits', '-')} layers as DequantizeLinear→MatMul)")
    info = write_onnx(source, layers, overrides, out_file)
    for name in RUNTIME_FILES:
        if (source.model_dir / name).is_file():
            shutil.copy2(source.model_dir / name, ctx.out_dir / name)

    v = cfg.verify
    ctx.log(f"verifying against PyTorch at batch {v.batch}, seq {v.seq_len}, past {v.past_len} (atol {v.atol}, rtol {v.rtol})")
    # One side at a time: ONNX Runtime's session is gone before the PyTorch reference is built.
    shape = DecoderSpec.from_dict(info["decoder"])
    got = onnx_outputs(out_file, shape, v)
    results = compare_outputs(torch_outputs(reference_model(source, layers, overrides), shape, v), got, v)
    failed = [r for r in results if not r["passed"]]
    worst = max(results, key=lambda r: r["max_abs_diff"])
    ctx.log(f"[green]✓[/green] {len(results) - len(failed)} of {len(results)} outputs within tolerance; "
            f"worst {worst['output']}: max |Δ| {worst['max_abs_diff']:.2e} (limit {worst['limit']:.2e})")
    for r in failed:
        ctx.log(f"[red]✗[/red] {r['output']}: max |Δ| {r['max_abs_diff']:.2e} > limit {r['limit']:.2e}, shape {tuple(r['shape'])}")
    write_json_atomic(ctx.out_dir / "verification.json", {"tolerance": v.model_dump(), "outputs": results})
    if failed:
        raise ExportMismatch(
            f"{len(failed)} of {len(results)} ONNX outputs differ from PyTorch beyond atol {v.atol} + rtol {v.rtol}·max|ref|: "
            + ", ".join(f"{r['output']} (max |Δ| {r['max_abs_diff']:.3g})" for r in failed)
        )
    return OnnxModel(
        path=ctx.out_dir,
        meta={**info, "opset": cfg.opset, "quantized_layers": len(layers),
              "verify_max_abs_diff": worst["max_abs_diff"], "runtime_files": sorted(p.name for p in ctx.out_dir.iterdir() if p.name in RUNTIME_FILES)},
    )
