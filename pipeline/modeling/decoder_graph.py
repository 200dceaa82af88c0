"""One decoder loop, two kinds of graph.

`write_decoder` walks a `DecoderSpec` once: embedding (× multiplier), then per layer the norms the
spec names around attention and MLP, q/k norms, residual multipliers, and finally the head (÷
divisor, soft-capping). What each step becomes is the `ops` object's business:

- `PortableOps`: standard ONNX opset 21 only (the `export` graph, and what TensorRT parses).
  Inputs: input_ids [batch, seq] int64, attention_mask [batch, total] int64 (total = past + seq),
  position_ids [batch, seq] int64, past_key_values.<i>.key/value [batch, kv_heads, past, head_dim].
  Outputs: logits [batch, seq, vocab], present.<i>.key/value [batch, kv_heads, total, head_dim].
  Quantized layers are blocked `DequantizeLinear → MatMul` (ONNX Runtime fuses the pair into
  `MatMulNBits`; TensorRT reads it as int4 weight-only). Sliding windows are part of the mask.
- `FusedOps`: ONNX Runtime's contrib ops for `build.graph: fused`: `GroupQueryAttention` (rotary
  inside, `local_window_size` for sliding layers, `softcap`), `SkipSimplifiedLayerNormalization`
  wherever a norm follows a residual add, q/k/v and gate/up packed into one int4 matmul each.
  Inputs: input_ids; seqlens_k [batch] int32 (each row's total length - 1); total_sequence_length
  [] int32; logits_index [batch, keep] int64 (the positions of this call whose logits are wanted:
  a prompt needs only its last one, and the head is the largest matmul of a long prompt);
  past_key_values.* as above (bound to a shared buffer of max_sequence_length positions).
  Outputs: logits [batch, keep, vocab], present.* as above.

The two differ in the operators they emit, never in which layers exist.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from pipeline.modeling.decoder import DecoderSpec
from pipeline.modeling.onnx_graph import IR_VERSION, OPSET, ExternalData, GraphBuilder, dequantized_weight
from pipeline.modeling.weights import Linear

MS_DOMAIN = "com.microsoft"
F32 = np.float32


def write_decoder(spec: DecoderSpec, weights, ops) -> None:
    """The decoder, once, in terms of `ops` (see the module docstring)."""
    g = ops.g
    head = weights.head()
    if head.tied:
        # One copy of the table, stored as the head's [hidden, vocab] weight: the embedding gathers
        # its columns (exact; the head matmul is what reads the whole table every step).
        columns = g.op("Gather", [ops.weight_input(head), "input_ids"], axis=1)  # [hidden, batch, seq]
        residual = g.op("Transpose", [columns], perm=[1, 2, 0])
    else:
        residual = g.op("Gather", [g.init("model.embed_tokens.weight", weights.tensor("model.embed_tokens.weight")), "input_ids"], axis=0)
    if spec.embedding_multiplier != 1.0:
        residual = g.op("Mul", [residual, g.const(spec.embedding_multiplier, F32)])
    first_norm = spec.norm_weight(0, "attn_in")
    x = ops.norm(residual, first_norm, weights) if first_norm else residual
    for i in range(spec.num_layers):
        h = attention_block(spec, weights, ops, i, x)
        x, residual = ops.add_norm(h, residual, spec.norm_weight(i, "mlp_in"), weights, f"model.layers.{i}/mlp_in")
        h = mlp_block(spec, weights, ops, i, x)
        next_norm = spec.norm_weight(i + 1, "attn_in") if i + 1 < spec.num_layers else "model.norm.weight"
        x, residual = ops.add_norm(h, residual, next_norm, weights, f"model.layers.{i}/next_in")
    logits = ops.linear(ops.head_input(x), head)
    if spec.logit_divisor != 1.0:
        logits = g.op("Div", [logits, g.const(spec.logit_divisor, F32)])
    if spec.final_softcap:
        logits = softcap(g, logits, spec.final_softcap)
    g.op("Identity", [logits], outputs=["logits"])


def attention_block(spec: DecoderSpec, weights, ops, i: int, x: str) -> str:
    g = ops.g
    q, k, v = ops.projections(x, [weights.linear(i, n) for n in ("q", "k", "v")])
    if spec.qk_norm == "full":
        q, k = ops.norm(q, spec.norm_weight(i, "q"), weights), ops.norm(k, spec.norm_weight(i, "k"), weights)
    elif spec.qk_norm == "head":
        q = per_head(g, q, spec.num_heads, spec.head_dim, lambda t: ops.norm(t, spec.norm_weight(i, "q"), weights))
        k = per_head(g, k, spec.num_kv_heads, spec.head_dim, lambda t: ops.norm(t, spec.norm_weight(i, "k"), weights))
    h = ops.linear(ops.attention(i, q, k, v), weights.linear(i, "o"))
    return post_sublayer(spec, weights, ops, h, spec.norm_weight(i, "attn_out"))


def mlp_block(spec: DecoderSpec, weights, ops, i: int, x: str) -> str:
    g = ops.g
    gate, up = ops.projections(x, [weights.linear(i, n) for n in ("gate", "up")])
    if spec.activation == "silu":
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
    else:
        act = g.op("Gelu", [gate], approximate="tanh")
    h = ops.linear(g.op("Mul", [act, up]), weights.linear(i, "down"))
    return post_sublayer(spec, weights, ops, h, spec.norm_weight(i, "mlp_out"))


def post_sublayer(spec: DecoderSpec, weights, ops, h: str, norm: str | None) -> str:
    if norm:
        h = ops.norm(h, norm, weights)
    if spec.residual_multiplier != 1.0:
        h = ops.g.op("Mul", [h, ops.g.const(spec.residual_multiplier, F32)])
    return h


def per_head(g: GraphBuilder, x: str, heads: int, head_dim: int, fn) -> str:
    """Apply `fn` over each head's dims of a [batch, seq, heads*head_dim] tensor."""
    return g.op("Reshape", [fn(g.op("Reshape", [x, g.const([0, 0, heads, head_dim])])), g.const([0, 0, heads * head_dim])])


def softcap(g: GraphBuilder, x: str, cap: float) -> str:
    """cap * tanh(x / cap), as transformers computes it."""
    return g.op("Mul", [g.op("Tanh", [g.op("Div", [x, g.const(cap, F32)])]), g.const(cap, F32)])


class CommonOps:
    def __init__(self, spec: DecoderSpec, rope: dict[str, tuple[np.ndarray, float]], external: ExternalData | None = None):
        self.g = GraphBuilder(external)
        self.spec, self.rope = spec, rope
        self._weights: dict[str, str] = {}

    def weight_input(self, layer: Linear) -> str:
        """The [in, out] weight of a layer, written once however often it is read."""
        if layer.name not in self._weights:
            if layer.quantized is not None:
                self._weights[layer.name] = dequantized_weight(self.g, layer.name, [layer.quantized])
            else:
                self._weights[layer.name] = self.g.init(f"{layer.name}.weight_t", np.ascontiguousarray(layer.weight.T, dtype=F32))
        return self._weights[layer.name]

    def linear(self, x: str, layer: Linear) -> str:
        y = self.g.op("MatMul", [x, self.weight_input(layer)], name=f"{layer.name}/MatMul")
        if layer.bias is not None:
            y = self.g.op("Add", [y, self.g.init(f"{layer.name}.bias", layer.bias.astype(F32))])
        return y

    def norm_weight(self, name: str, weights) -> str:
        return self.g.init(name, weights.norm(name))

    def finish(self, inputs, outputs, graph_name: str, domains: list[tuple[str, int]]) -> onnx.ModelProto:
        g = self.g
        graph = helper.make_graph(g.nodes, graph_name, inputs, outputs, g.initializers)
        opsets = [helper.make_opsetid(domain, version) for domain, version in [("", OPSET), *domains]]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="kiln")
        model.ir_version = IR_VERSION
        return model

    def kv_io(self, past: str, present: str) -> tuple[list, list]:
        spec, inputs, outputs = self.spec, [], []
        for i in range(spec.num_layers):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT,
                                                            ["batch", spec.num_kv_heads, past, spec.head_dim]))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT,
                                                             ["batch", spec.num_kv_heads, present, spec.head_dim]))
        return inputs, outputs

    def logits_output(self):
        return helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", self.spec.vocab_size])


class PortableOps(CommonOps):
    """Standard opset-21 operators."""

    def head_input(self, x: str) -> str:
        return x  # logits at every position

    def __init__(self, spec, rope, external: ExternalData | None = None):
        super().__init__(spec, rope, external)
        self._rotary: dict[str, tuple[str, str]] = {}
        self._bias: dict[int | None, str] = {}

    def norm(self, x: str, weight_name: str, weights) -> str:
        # The Pow/ReduceMean/Add/Sqrt/Div/Mul chain is the pattern ONNX Runtime fuses into
        # SimplifiedLayerNormalization, and is plain opset-21 for every other runtime.
        g = self.g
        sq = g.op("Pow", [x, g.const(2.0, F32)])
        mean = g.op("ReduceMean", [sq, g.const([-1])], keepdims=1)
        std = g.op("Sqrt", [g.op("Add", [mean, g.const(self.spec.norm_eps, F32)])])
        return g.op("Mul", [g.op("Div", [x, std]), self.norm_weight(weight_name, weights)])

    def add_norm(self, h: str, residual: str, weight_name: str | None, weights, _node: str) -> tuple[str, str]:
        total = self.g.op("Add", [residual, h])
        return (self.norm(total, weight_name, weights) if weight_name else total), total

    def projections(self, x: str, layers: list[Linear]) -> list[str]:
        return [self.linear(x, layer) for layer in layers]

    def rotary(self, key: str) -> tuple[str, str]:
        """cos/sin [B, 1, S, rotary_dim] for one rotary table, computed from position_ids."""
        if key not in self._rotary:
            g = self.g
            inv_freq, scaling = self.rope[key]
            pos = g.op("Cast", ["position_ids"], to=TensorProto.FLOAT)
            freqs = g.op("Mul", [g.op("Unsqueeze", [pos, g.const([-1])]), g.init(f"rope.{key}.inv_freq", inv_freq.astype(F32))])
            angles = g.op("Concat", [freqs, freqs], axis=-1)
            cos, sin = g.op("Cos", [angles]), g.op("Sin", [angles])
            if scaling != 1.0:
                cos, sin = g.op("Mul", [cos, g.const(scaling, F32)]), g.op("Mul", [sin, g.const(scaling, F32)])
            self._rotary[key] = (g.op("Unsqueeze", [cos, g.const([1])]), g.op("Unsqueeze", [sin, g.const([1])]))
        return self._rotary[key]

    def rotate(self, x: str, cos: str, sin: str) -> str:
        g, D, R = self.g, self.spec.head_dim, self.spec.rotary_dim
        rot, rest = (x, None) if R == D else g.op("Split", [x, g.const([R, D - R])], axis=-1, outputs=2)
        x1, x2 = g.op("Split", [rot, g.const([R // 2, R // 2])], axis=-1, outputs=2)
        rotated = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
        out = g.op("Add", [g.op("Mul", [rot, cos]), g.op("Mul", [rotated, sin])])
        return out if rest is None else g.op("Concat", [out, rest], axis=-1)

    def mask_bias(self, window: int | None) -> str:
        """Causal (+ sliding window) + padding mask as an additive bias [B, 1, n_rep*S, T]."""
        if window not in self._bias:
            g = self.g
            seq_len = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const(1)], axis=0)
            total_len = g.op("Gather", [g.op("Shape", ["attention_mask"]), g.const(1)], axis=0)
            key_pos = g.op("Unsqueeze", [g.op("Range", [g.const(0), total_len, g.const(1)]), g.const([0])])
            query_pos = g.op("Unsqueeze", [g.op("Range", [g.op("Sub", [total_len, seq_len]), total_len, g.const(1)]), g.const([1])])
            allowed = g.op("LessOrEqual", [key_pos, query_pos])
            if window is not None:  # transformers' sliding window: q - window < k
                allowed = g.op("And", [allowed, g.op("Greater", [key_pos, g.op("Sub", [query_pos, g.const(window)])])])
            padding = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], to=TensorProto.BOOL), g.const([1, 2])])
            allowed = g.op("And", [g.op("Unsqueeze", [allowed, g.const([0, 1])]), padding])  # [B, 1, S, T]
            bias = g.op("Where", [allowed, g.const(0.0, F32), g.const(np.finfo(np.float32).min, F32)])
            n_rep = self.spec.num_heads // self.spec.num_kv_heads
            self._bias[window] = g.op("Tile", [bias, g.const([1, 1, n_rep, 1])]) if n_rep > 1 else bias
        return self._bias[window]

    def attention(self, i: int, q: str, k: str, v: str) -> str:
        g, spec = self.g, self.spec
        H, KV, D = spec.num_heads, spec.num_kv_heads, spec.head_dim

        def heads(x: str, n: int) -> str:
            return g.op("Transpose", [g.op("Reshape", [x, g.const([0, 0, n, D])])], perm=[0, 2, 1, 3])

        cos, sin = self.rotary(spec.layer_rope[i])
        q, k = self.rotate(heads(q, H), cos, sin), self.rotate(heads(k, KV), cos, sin)
        k_all = g.op("Concat", [f"past_key_values.{i}.key", k], axis=2, outputs=[f"present.{i}.key"])
        v_all = g.op("Concat", [f"past_key_values.{i}.value", heads(v, KV)], axis=2, outputs=[f"present.{i}.value"])
        # Grouped-query attention without copying K/V: fold the n_rep query heads that share a
        # KV head into the sequence axis, [B, H, S, D] -> [B, KV, n_rep*S, D].
        q_grouped = g.op("Reshape", [q, g.const([0, KV, -1, D])])
        scores = g.op("Mul", [g.op("MatMul", [q_grouped, g.op("Transpose", [k_all], perm=[0, 1, 3, 2])]), g.const(spec.scale, F32)])
        if spec.attention_softcap:
            scores = softcap(g, scores, spec.attention_softcap)
        probs = g.op("Softmax", [g.op("Add", [scores, self.mask_bias(spec.window(i))])], axis=-1)
        ctx = g.op("Reshape", [g.op("MatMul", [probs, v_all]), g.const([0, H, -1, D])])
        return g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), g.const([0, 0, H * D])])

    def model(self, graph_name: str) -> onnx.ModelProto:
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
                  helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"])]
        kv_in, kv_out = self.kv_io("past_sequence", "total_sequence")
        return self.finish(inputs + kv_in, [self.logits_output()] + kv_out, graph_name, [])


def packable(layers: list[Linear]) -> bool:
    first = layers[0].quantized
    return first is not None and all(
        q is not None and q.bits == first.bits and q.group_size == first.group_size and (q.zeros is None) == (first.zeros is None)
        for q in (layer.quantized for layer in layers))


class FusedOps(CommonOps):
    """ONNX Runtime contrib operators (see the module docstring)."""

    def __init__(self, spec, rope, max_positions: int, external: ExternalData | None = None):
        super().__init__(spec, rope, external)
        self.max_positions = max_positions
        self._caches: dict[str, tuple[str, str]] = {}

    def norm(self, x: str, weight_name: str, weights) -> str:
        return self.g.op("SimplifiedLayerNormalization", [x, self.norm_weight(weight_name, weights)], axis=-1,
                         epsilon=self.spec.norm_eps, stash_type=1)

    def add_norm(self, h: str, residual: str, weight_name: str | None, weights, node: str) -> tuple[str, str]:
        """(normed, residual + h): output 3 is the new residual stream, summed as the portable graph sums it."""
        if not weight_name:
            total = self.g.op("Add", [residual, h])
            return total, total
        self.g.op("SkipSimplifiedLayerNormalization", [h, residual, self.norm_weight(weight_name, weights)], name=node,
                  domain=MS_DOMAIN, epsilon=self.spec.norm_eps, outputs=[f"{node}_out", "", "", f"{node}_sum"])
        return f"{node}_out", f"{node}_sum"

    def projections(self, x: str, layers: list[Linear]) -> list[str]:
        """Several linear layers on the same input: one matmul when their int4 layouts agree."""
        if not packable(layers):
            return [self.linear(x, layer) for layer in layers]
        g = self.g
        packed = layers[0].name.rsplit(".", 1)[0] + "." + "_".join(layer.name.rsplit(".", 1)[1] for layer in layers)
        y = g.op("MatMul", [x, dequantized_weight(g, packed, [layer.quantized for layer in layers])], name=f"{packed}/MatMul")
        if any(layer.bias is not None for layer in layers):
            bias = np.concatenate([layer.bias if layer.bias is not None else np.zeros(layer.out_features, F32) for layer in layers])
            y = g.op("Add", [y, g.init(f"{packed}.bias", bias.astype(F32))])
        return g.op("Split", [y, g.const([layer.out_features for layer in layers])], axis=-1, outputs=len(layers))

    def head_input(self, x: str) -> str:
        """Only the positions `logits_index` names reach the head: [batch, seq, hidden] -> [batch, keep, hidden]."""
        g = self.g
        return g.op("GatherND", [x, g.op("Unsqueeze", ["logits_index", g.const([-1])])], batch_dims=1)

    def rotary_cache(self, key: str) -> tuple[str, str]:
        """cos/sin [max_positions, rotary_dim/2], in float32 the way the portable graph computes them."""
        if key not in self._caches:
            inv_freq, scaling = self.rope[key]
            angles = np.arange(self.max_positions, dtype=F32)[:, None] * inv_freq.astype(F32)[None, :]
            cos, sin = np.cos(angles), np.sin(angles)
            if scaling != 1.0:
                cos, sin = cos * F32(scaling), sin * F32(scaling)
            self._caches[key] = (self.g.init(f"rope.{key}.cos_cache", cos.astype(F32)), self.g.init(f"rope.{key}.sin_cache", sin.astype(F32)))
        return self._caches[key]

    def attention(self, i: int, q: str, k: str, v: str) -> str:
        spec = self.spec
        cos, sin = self.rotary_cache(spec.layer_rope[i])
        attrs: dict[str, Any] = {"num_heads": spec.num_heads, "kv_num_heads": spec.num_kv_heads, "do_rotary": 1,
                                 "rotary_interleaved": 0, "scale": float(spec.scale)}
        window = spec.window(i)
        if window is not None:
            attrs["local_window_size"] = window
        if spec.attention_softcap:
            attrs["softcap"] = float(spec.attention_softcap)
        p = f"model.layers.{i}"
        inputs = [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k", "total_sequence_length", cos, sin]
        ctx, _, _ = self.g.op("GroupQueryAttention", inputs, name=f"{p}/GroupQueryAttention", domain=MS_DOMAIN,
                              outputs=[f"{p}/attn_out", f"present.{i}.key", f"present.{i}.value"], **attrs)
        return ctx

    def model(self, graph_name: str) -> onnx.ModelProto:
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
                  helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
                  helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
                  helper.make_tensor_value_info("logits_index", TensorProto.INT64, ["batch", "keep"])]
        kv_in, kv_out = self.kv_io("past_sequence", "present_sequence")
        logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "keep", self.spec.vocab_size])
        return self.finish(inputs + kv_in, [logits] + kv_out, graph_name, [(MS_DOMAIN, 1)])


def portable_graph(spec: DecoderSpec, weights, rope: dict[str, tuple[np.ndarray, float]],
                   external: ExternalData | None = None) -> onnx.ModelProto:
    ops = PortableOps(spec, rope, external)
    write_decoder(spec, weights, ops)
    return ops.model(f"kiln_{spec.model_type}")


def fused_graph(spec: DecoderSpec, weights, rope: dict[str, tuple[np.ndarray, float]], max_positions: int,
                external: ExternalData | None = None) -> onnx.ModelProto:
    ops = FusedOps(spec, rope, max_positions, external)
    write_decoder(spec, weights, ops)
    return ops.model(f"kiln_{spec.model_type}_ort_fused")
