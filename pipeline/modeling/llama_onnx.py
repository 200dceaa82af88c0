"""Write a Llama-family decoder as a standard ONNX graph (opset 21) with KV-cache I/O.

Inputs:  input_ids [batch, seq] int64, attention_mask [batch, total] int64 (total = past + seq),
         position_ids [batch, seq] int64, past_key_values.<i>.key/value [batch, kv_heads, past, head_dim]
Outputs: logits [batch, seq, vocab], present.<i>.key/value [batch, kv_heads, total, head_dim]

Quantized Linear layers are written as blocked `DequantizeLinear(int4/uint4 codes, scales, zero
points; axis=0, block_size=G)` feeding `MatMul`, from the quantizer's own codes, so nothing is
quantized twice. ONNX Runtime fuses that pair into `MatMulNBits`; TensorRT reads it as int4
weight-only. Only standard ONNX ops are used here; runtime-specific fusions belong to `build`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.quantization.format import QuantizedLinear

OPSET = 21
IR_VERSION = 10  # ONNX IR 10 is the first with int4/uint4 tensors


@dataclass(frozen=True)
class LlamaShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, cfg: Mapping) -> "LlamaShape":
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def pack_4bit(values: np.ndarray) -> bytes:
    """ONNX int4/uint4 raw layout: two elements a byte, the first in the low nibble."""
    flat = values.astype(np.uint8).reshape(-1) & 0x0F
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def int_tensor(name: str, values: np.ndarray, bits: int, signed: bool) -> TensorProto:
    if bits == 4:
        dtype = TensorProto.INT4 if signed else TensorProto.UINT4
        return helper.make_tensor(name, dtype, values.shape, pack_4bit(values), raw=True)
    arr = values.astype(np.int8 if signed else np.uint8)
    return numpy_helper.from_array(arr, name)


class GraphBuilder:
    """Just enough graph building to keep the model code readable: unique names, constants."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._count = 0
        self._consts: dict[tuple, str] = {}

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def init(self, name: str, tensor: TensorProto | np.ndarray) -> str:
        if isinstance(tensor, np.ndarray):
            tensor = numpy_helper.from_array(tensor, name)
        tensor.name = name
        self.initializers.append(tensor)
        return name

    def const(self, values, dtype=np.int64) -> str:
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(self._name("const"), arr)
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], *, name: str | None = None, outputs: int | list[str] = 1, **attrs):
        node_name = name or self._name(op_type)
        outs = outputs if isinstance(outputs, list) else [f"{node_name}_out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node_name, **attrs))
        return outs[0] if len(outs) == 1 else outs


def dequantized_weight(g: GraphBuilder, name: str, layers: list[QuantizedLinear]) -> str:
    """One blocked DequantizeLinear over the layers' codes side by side along the output axis, so
    layers that read the same input (q/k/v, gate/up) can share one MatMul; each output column
    still sees exactly its own codes, scales and zero points."""
    q = layers[0]
    signed = q.zeros is None
    # ONNX MatMul computes x @ B with B [in, out]: transpose codes/scales/zeros, block along axis 0.
    codes = np.concatenate([np.ascontiguousarray(layer.codes.T) for layer in layers], axis=1)
    scales = np.concatenate([layer.scales.T for layer in layers], axis=1).astype(np.float32)
    dq_inputs = [g.init(f"{name}.qweight", int_tensor("", codes, q.bits, signed)),
                 g.init(f"{name}.scales", np.ascontiguousarray(scales))]
    if not signed:
        zeros = np.concatenate([layer.zeros.T for layer in layers], axis=1)
        dq_inputs.append(g.init(f"{name}.zeros", int_tensor("", np.ascontiguousarray(zeros), q.bits, False)))
    return g.op("DequantizeLinear", dq_inputs, name=f"{name}/DequantizeLinear", axis=0, block_size=q.group_size)


def linear_layer(g: GraphBuilder, x: str, layer: str, weight: Callable[[str], np.ndarray],
                 has_weight: Callable[[str], bool], quantized: Mapping[str, QuantizedLinear]) -> str:
    if layer in quantized:
        w = dequantized_weight(g, layer, [quantized[layer]])
    else:
        w = g.init(f"{layer}.weight_t", np.ascontiguousarray(weight(f"{layer}.weight").T, dtype=np.float32))
    y = g.op("MatMul", [x, w], name=f"{layer}/MatMul")
    if has_weight(f"{layer}.bias"):
        y = g.op("Add", [y, g.init(f"{layer}.bias", weight(f"{layer}.bias").astype(np.float32))])
    return y


def logits_output(g: GraphBuilder, hidden: str, weight: Callable[[str], np.ndarray],
                  has_weight: Callable[[str], bool], quantized: Mapping[str, QuantizedLinear]) -> None:
    """The `logits` output: lm_head, quantized or float (tied checkpoints reuse the embedding)."""
    if "lm_head" in quantized:
        logits_in = linear_layer(g, hidden, "lm_head", weight, has_weight, quantized)
    else:
        lm_weight = "lm_head.weight" if has_weight("lm_head.weight") else "model.embed_tokens.weight"
        w = g.init("lm_head.weight_t", np.ascontiguousarray(weight(lm_weight).T, dtype=np.float32))
        logits_in = g.op("MatMul", [hidden, w], name="lm_head/MatMul")
    g.op("Identity", [logits_in], outputs=["logits"])


def build_llama_graph(
    shape: LlamaShape,
    weight: Callable[[str], np.ndarray],
    has_weight: Callable[[str], bool],
    quantized: Mapping[str, QuantizedLinear],
    inv_freq: np.ndarray,
    attention_scaling: float = 1.0,
    graph_name: str = "kiln_llama",
) -> onnx.ModelProto:
    """`weight(name)` returns a float tensor of the HF state dict (e.g. `model.norm.weight`)."""
    g = GraphBuilder()
    f32 = np.float32
    H, KV, D = shape.num_heads, shape.num_kv_heads, shape.head_dim
    n_rep = H // KV

    def linear(x: str, layer: str) -> str:
        return linear_layer(g, x, layer, weight, has_weight, quantized)

    def rms_norm(x: str, weight_name: str) -> str:
        # The Pow/ReduceMean/Add/Sqrt/Div/Mul chain is the pattern ONNX Runtime fuses into
        # SimplifiedLayerNormalization, and is plain opset-21 for every other runtime.
        sq = g.op("Pow", [x, g.const(2.0, f32)])
        mean = g.op("ReduceMean", [sq, g.const([-1])], keepdims=1)
        std = g.op("Sqrt", [g.op("Add", [mean, g.const(shape.rms_norm_eps, f32)])])
        normed = g.op("Div", [x, std])
        return g.op("Mul", [normed, g.init(weight_name, weight(weight_name).astype(f32))])

    def rotate(x: str, cos: str, sin: str) -> str:
        x1, x2 = g.op("Split", [x, g.const([D // 2, D // 2])], axis=-1, outputs=2)
        rotated = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])

    # ---- shared per-forward values: embeddings, rotary tables, attention bias
    emb_w = g.init("model.embed_tokens.weight", weight("model.embed_tokens.weight").astype(f32))
    hidden = g.op("Gather", [emb_w, "input_ids"], axis=0)

    pos = g.op("Cast", ["position_ids"], to=TensorProto.FLOAT)
    freqs = g.op("Mul", [g.op("Unsqueeze", [pos, g.const([-1])]), g.init("rope.inv_freq", inv_freq.astype(f32))])
    angles = g.op("Concat", [freqs, freqs], axis=-1)  # [B, S, D]
    cos, sin = g.op("Cos", [angles]), g.op("Sin", [angles])
    if attention_scaling != 1.0:
        cos = g.op("Mul", [cos, g.const(attention_scaling, f32)])
        sin = g.op("Mul", [sin, g.const(attention_scaling, f32)])
    cos = g.op("Unsqueeze", [cos, g.const([1])])  # [B, 1, S, D]
    sin = g.op("Unsqueeze", [sin, g.const([1])])

    # Causal + padding mask as an additive bias [B, 1, n_rep*S, T] (rows tiled for grouped heads).
    seq_len = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const(1)], axis=0)
    total_len = g.op("Gather", [g.op("Shape", ["attention_mask"]), g.const(1)], axis=0)
    past_len = g.op("Sub", [total_len, seq_len])
    key_pos = g.op("Range", [g.const(0), total_len, g.const(1)])
    query_pos = g.op("Range", [past_len, total_len, g.const(1)])
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [key_pos, g.const([0])]), g.op("Unsqueeze", [query_pos, g.const([1])])])
    padding = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], to=TensorProto.BOOL), g.const([1, 2])])
    allowed = g.op("And", [g.op("Unsqueeze", [causal, g.const([0, 1])]), padding])  # [B, 1, S, T]
    bias = g.op("Where", [allowed, g.const(0.0, f32), g.const(np.finfo(np.float32).min, f32)])
    if n_rep > 1:
        bias = g.op("Tile", [bias, g.const([1, 1, n_rep, 1])])
    scale = g.const(1.0 / np.sqrt(D), f32)

    for i in range(shape.num_layers):
        p = f"model.layers.{i}"
        residual = hidden
        x = rms_norm(hidden, f"{p}.input_layernorm.weight")
        q = g.op("Transpose", [g.op("Reshape", [linear(x, f"{p}.self_attn.q_proj"), g.const([0, 0, H, D])])], perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [linear(x, f"{p}.self_attn.k_proj"), g.const([0, 0, KV, D])])], perm=[0, 2, 1, 3])
        v = g.op("Transpose", [g.op("Reshape", [linear(x, f"{p}.self_attn.v_proj"), g.const([0, 0, KV, D])])], perm=[0, 2, 1, 3])
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k_all = g.op("Concat", [f"past_key_values.{i}.key", k], axis=2, outputs=[f"present.{i}.key"])
        v_all = g.op("Concat", [f"past_key_values.{i}.value", v], axis=2, outputs=[f"present.{i}.value"])
        # Grouped-query attention without copying K/V: fold the n_rep query heads that share a
        # KV head into the sequence axis, [B, H, S, D] -> [B, KV, n_rep*S, D].
        q_grouped = g.op("Reshape", [g.op("Mul", [q, scale]), g.const([0, KV, -1, D])])
        scores = g.op("MatMul", [q_grouped, g.op("Transpose", [k_all], perm=[0, 1, 3, 2])])
        probs = g.op("Softmax", [g.op("Add", [scores, bias])], axis=-1)
        ctx = g.op("Reshape", [g.op("MatMul", [probs, v_all]), g.const([0, H, -1, D])])
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), g.const([0, 0, H * D])])
        hidden = g.op("Add", [residual, linear(ctx, f"{p}.self_attn.o_proj")])

        residual = hidden
        x = rms_norm(hidden, f"{p}.post_attention_layernorm.weight")
        gate = linear(x, f"{p}.mlp.gate_proj")
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])  # SiLU
        up = linear(x, f"{p}.mlp.up_proj")
        hidden = g.op("Add", [residual, linear(g.op("Mul", [act, up]), f"{p}.mlp.down_proj")])

    hidden = rms_norm(hidden, "model.norm.weight")
    logits_output(g, hidden, weight, has_weight, quantized)

    dims = {"batch": "batch", "seq": "sequence", "total": "total_sequence", "past": "past_sequence"}
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [dims["batch"], dims["seq"]]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [dims["batch"], dims["total"]]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, [dims["batch"], dims["seq"]]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [dims["batch"], dims["seq"], shape.vocab_size])]
    for i in range(shape.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, [dims["batch"], KV, dims["past"], D]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, [dims["batch"], KV, dims["total"], D]))
    graph = helper.make_graph(g.nodes, graph_name, inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="kiln")
    model.ir_version = IR_VERSION
    return model
