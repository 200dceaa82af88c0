"""The ONNX Runtime-specific decoder graph that `build` writes for onnxruntime targets.

Same weights as the exported opset-21 graph (read back from it, see `weights_from_onnx`), fewer and
larger operators:
- attention: `com.microsoft.GroupQueryAttention` with rotary inside (`do_rotary`), grouped KV heads
  without repetition, and the KV cache in a buffer of `max_sequence_length` positions that past and
  present share (the runtime binds the same buffer to both; nothing is copied per token);
- RMSNorm with the residual add: `SimplifiedLayerNormalization` / `com.microsoft.SkipSimplifiedLayerNormalization`;
- q/k/v and gate/up projections each as one int4 matmul over the layers' codes side by side
  (ORT fuses the DequantizeLinear→MatMul pair into `MatMulNBits` when it optimizes the graph).
These are contrib ops, so this graph is for ONNX Runtime only; the exported graph stays standard
opset 21 for every other runtime (TensorRT reads that one).

Inputs:  input_ids [batch, seq] int64; seqlens_k [batch] int32 (each row's total length - 1);
         total_sequence_length [] int32; past_key_values.<i>.key/value [batch, kv_heads, past, head_dim]
Outputs: logits [batch, seq, vocab]; present.<i>.key/value [batch, kv_heads, present, head_dim]
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.modeling.llama_onnx import IR_VERSION, OPSET, GraphBuilder, LlamaShape, dequantized_weight, linear_layer, logits_output
from pipeline.quantization.format import QuantizedLinear

MS_DOMAIN = "com.microsoft"


def weights_from_onnx(model: onnx.ModelProto) -> tuple[Callable[[str], np.ndarray], Callable[[str], bool], dict[str, QuantizedLinear], np.ndarray]:
    """The exported graph's own tensors in the HF names `build_llama_graph` reads: float weights
    (transposed back), quantized layers (codes, scales, zero points unpacked unchanged) and inv_freq."""
    tensors = {t.name: t for t in model.graph.initializer}
    block_size = {n.name.removesuffix("/DequantizeLinear"): next(a.i for a in n.attribute if a.name == "block_size")
                  for n in model.graph.node if n.op_type == "DequantizeLinear"}
    quantized = {}
    for layer, group in block_size.items():
        codes = tensors[f"{layer}.qweight"]
        bits = 4 if codes.data_type in (TensorProto.INT4, TensorProto.UINT4) else 8
        zeros = tensors.get(f"{layer}.zeros")
        quantized[layer] = QuantizedLinear(
            codes=np.ascontiguousarray(numpy_helper.to_array(codes).T).astype(np.int8 if zeros is None else np.uint8),
            scales=np.ascontiguousarray(numpy_helper.to_array(tensors[f"{layer}.scales"]).T),
            zeros=None if zeros is None else np.ascontiguousarray(numpy_helper.to_array(zeros).T).astype(np.uint8),
            bits=bits, group_size=group)

    def stored_name(name: str) -> str | None:
        if name in tensors:
            return name
        transposed = name.removesuffix(".weight") + ".weight_t"
        return transposed if name.endswith(".weight") and transposed in tensors else None

    def weight(name: str) -> np.ndarray:
        stored = stored_name(name)
        if stored is None:
            raise KeyError(name)
        arr = numpy_helper.to_array(tensors[stored])
        return np.ascontiguousarray(arr.T) if stored.endswith(".weight_t") else arr

    return weight, lambda name: stored_name(name) is not None, quantized, numpy_helper.to_array(tensors["rope.inv_freq"])


def rotary_caches(inv_freq: np.ndarray, attention_scaling: float, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_positions, head_dim/2], in float32 the way the exported graph computes them."""
    angles = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    if attention_scaling != 1.0:
        cos, sin = cos * np.float32(attention_scaling), sin * np.float32(attention_scaling)
    return cos.astype(np.float32), sin.astype(np.float32)


def packable(layers: list[QuantizedLinear | None]) -> bool:
    first = layers[0]
    return first is not None and all(
        q is not None and q.bits == first.bits and q.group_size == first.group_size and (q.zeros is None) == (first.zeros is None)
        for q in layers)


def build_fused_llama_graph(
    shape: LlamaShape,
    weight: Callable[[str], np.ndarray],
    has_weight: Callable[[str], bool],
    quantized: Mapping[str, QuantizedLinear],
    inv_freq: np.ndarray,
    attention_scaling: float,
    max_positions: int,
    graph_name: str = "kiln_llama_ort_fused",
) -> onnx.ModelProto:
    g = GraphBuilder()
    f32 = np.float32
    H, KV, D = shape.num_heads, shape.num_kv_heads, shape.head_dim
    eps = shape.rms_norm_eps

    def projections(x: str, layers: list[str]) -> list[str]:
        """Several linear layers on the same input: one matmul when their int4 layouts agree."""
        qs = [quantized.get(name) for name in layers]
        if not packable(qs) or any(has_weight(f"{name}.bias") for name in layers):
            return [linear_layer(g, x, name, weight, has_weight, quantized) for name in layers]
        packed_name = layers[0].rsplit(".", 1)[0] + "." + "_".join(name.rsplit(".", 1)[1] for name in layers)
        y = g.op("MatMul", [x, dequantized_weight(g, packed_name, qs)], name=f"{packed_name}/MatMul")
        sizes = [q.codes.shape[0] for q in qs]
        return [y] if len(layers) == 1 else g.op("Split", [y, g.const(sizes)], axis=-1, outputs=len(layers))

    def skip_norm(x: str, skip: str, weight_name: str, node: str) -> tuple[str, str]:
        """(normed, x + skip): output 3 is the new residual stream, summed as the exported graph sums it."""
        g.op("SkipSimplifiedLayerNormalization", [x, skip, norm_weight(weight_name)], name=node, domain=MS_DOMAIN,
             epsilon=eps, outputs=[f"{node}_out", "", "", f"{node}_sum"])
        return f"{node}_out", f"{node}_sum"

    def norm_weight(name: str) -> str:
        return g.init(name, weight(name).astype(f32))

    cos, sin = rotary_caches(inv_freq, attention_scaling, max_positions)
    cos_cache, sin_cache = g.init("rope.cos_cache", cos), g.init("rope.sin_cache", sin)

    emb_w = g.init("model.embed_tokens.weight", weight("model.embed_tokens.weight").astype(f32))
    residual = g.op("Gather", [emb_w, "input_ids"], axis=0)
    x = g.op("SimplifiedLayerNormalization", [residual, norm_weight("model.layers.0.input_layernorm.weight")],
             axis=-1, epsilon=eps, stash_type=1)
    for i in range(shape.num_layers):
        p = f"model.layers.{i}"
        attn_layers = [f"{p}.self_attn.{n}_proj" for n in ("q", "k", "v")]
        qkv = projections(x, attn_layers)
        gqa_inputs = [qkv[0], "", ""] if len(qkv) == 1 else list(qkv)
        gqa_inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k", "total_sequence_length", cos_cache, sin_cache]
        ctx, _, _ = g.op("GroupQueryAttention", gqa_inputs, name=f"{p}/GroupQueryAttention", domain=MS_DOMAIN,
                   outputs=[f"{p}/attn_out", f"present.{i}.key", f"present.{i}.value"],
                   num_heads=H, kv_num_heads=KV, do_rotary=1, rotary_interleaved=0, scale=float(1.0 / np.sqrt(D)))
        attn = linear_layer(g, ctx, f"{p}.self_attn.o_proj", weight, has_weight, quantized)
        x, residual = skip_norm(attn, residual, f"{p}.post_attention_layernorm.weight", f"{p}/post_attention_norm")
        gate, up = projections(x, [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"])
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])  # SiLU
        mlp = linear_layer(g, g.op("Mul", [act, up]), f"{p}.mlp.down_proj", weight, has_weight, quantized)
        next_norm = f"model.layers.{i + 1}.input_layernorm.weight" if i + 1 < shape.num_layers else "model.norm.weight"
        x, residual = skip_norm(mlp, residual, next_norm, f"{p}/next_norm")

    logits_output(g, x, weight, has_weight, quantized)

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", shape.vocab_size])]
    for i in range(shape.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, ["batch", KV, "past_sequence", D]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, ["batch", KV, "present_sequence", D]))
    graph = helper.make_graph(g.nodes, graph_name, inputs, outputs, g.initializers)
    model = helper.make_model(graph, producer_name="kiln",
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = IR_VERSION
    return model
