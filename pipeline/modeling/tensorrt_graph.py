"""The copy of an exported Kiln graph that TensorRT parses: zero points folded away, and the
precision written into the graph (TensorRT builds strongly typed networks; version 11 removed
the fp16 builder flag).

Zero points. TensorRT's DequantizeLayer accepts only zero-valued zero points, but asymmetric
codes (Kiln's default, and GPTQ's better mode on SmolLM2) carry one per group. The rewrite is
exact: with unsigned codes q in 0..15, zero point z and scale s per group,
    W = (q - z) * s = (q - 8) * s + (8 - z) * s,
so `x @ W = x @ DQ(q - 8, s) + (x summed within each group) @ ((8 - z) * s)`. The first term is
signed int4 with no zero point (what TensorRT runs as weight-only int4); the second is a small
float matmul of [K/G] group sums by a [K/G, N] offset table (the size of the scales).

Precision. fp16 is written by ONNX Runtime's own converter. Every RMSNorm's statistics chain
(Pow → ReduceMean → Add eps → Sqrt → Div) and the softmax stay fp32: SmolLM2's residual stream
carries "massive activations" (|h| up to 2.2e4 from layer 12 on, measured), whose mean square
(8.3e5) overflows fp16's 65504 and turned the whole fp16 graph to noise before the chain was kept
whole (perplexity 40928 vs 22.18); masked scores underflow fp16 in the softmax. The normalized
output is small again and goes back to fp16. Logits stay fp32 for the caller; the KV cache
inputs/outputs become fp16, halving the cache. int4 codes are untouched; scales become fp16.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from pipeline.modeling.onnx_graph import int_tensor

# TensorRT's documented ONNX support for the operators Kiln's graphs use: op -> the tensor types the
# parser takes for it, and the input whose type that is. Read from onnx-tensorrt's docs/operators.md
# on its 10.1-GA branch (commit 96e7811, the newest in the stored copy), which covers opset 9 to 20;
# DequantizeLinear's documented restriction is "`x_zero_point` must be zero" (hence the fold
# above), and ReduceMean/ReduceSum/Slice/Unsqueeze need their axes as initializers or constants.
TENSORRT_DOC = "onnx-tensorrt docs/operators.md, 10.1-GA branch (commit 96e7811)"
_FLOAT = ("FLOAT", "FLOAT16", "BFLOAT16")
_NUMERIC = (*_FLOAT, "INT32", "INT64")
TENSORRT_OPS: dict[str, tuple[tuple[str, ...], int]] = {
    **{op: (_NUMERIC, 0) for op in ("Add", "Sub", "Mul", "Div", "Neg", "Greater", "LessOrEqual", "Range", "ReduceMean", "ReduceSum")},
    **{op: ((*_NUMERIC, "BOOL"), 0) for op in ("Concat", "Gather", "Identity", "Reshape", "Shape", "Split", "Tile", "Transpose",
                                                "Unsqueeze", "Expand", "Slice")},
    **{op: (_FLOAT, 0) for op in ("Cos", "Sin", "MatMul", "Pow", "Sigmoid", "Softmax", "Sqrt", "Tanh")},
    "Gelu": ((*_NUMERIC, "INT8"), 0),
    "Cast": ((*_NUMERIC, "UINT8", "BOOL"), 0),
    "And": (("BOOL",), 0),
    "Where": ((*_NUMERIC, "BOOL"), 1),
    "DequantizeLinear": (("INT8", "FLOAT8E4M3FN", "INT4"), 0),
}
AXES_AS_CONSTANT = ("ReduceMean", "ReduceSum", "Slice", "Unsqueeze")


def tensorrt_unsupported(model) -> list[str]:
    """Every node of `model` that TensorRT's documented ONNX support (TENSORRT_OPS) does not cover:
    op type, input type, a zero point, or axes computed at run time. Empty means the graph uses only
    what the parser documents (not that an engine builds: nothing here has run TensorRT)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    constants = {t.name for t in model.graph.initializer}
    problems = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in TENSORRT_OPS:
            problems.append(f"{node.name}: {node.domain or 'ai.onnx'}.{node.op_type} is not in {TENSORRT_DOC}")
            continue
        allowed, index = TENSORRT_OPS[node.op_type]
        dtype = TensorProto.DataType.Name(types.get(node.input[index], 0))
        if dtype not in allowed:
            problems.append(f"{node.name}: {node.op_type} input {node.input[index]!r} is {dtype}; documented: {', '.join(allowed)}")
        if has_zero_point(node):
            problems.append(f"{node.name}: DequantizeLinear with a zero point (TensorRT documents: x_zero_point must be zero)")
        if node.op_type in AXES_AS_CONSTANT and len(node.input) > 1 and node.input[-1] and node.input[-1] not in constants:
            problems.append(f"{node.name}: {node.op_type} axes {node.input[-1]!r} are computed, not an initializer")
    return problems


KEEP_FP32_OPS = ("Pow", "ReduceMean", "Sqrt", "Softmax")
KEEP_FP32_IO = ("logits",)
RMS_CHAIN = ("ReduceMean", "Add", "Sqrt", "Div")  # after the Pow, in order


def consumers_of(graph) -> dict[str, list]:
    """Tensor name -> the nodes that read it."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def has_zero_point(node) -> bool:
    return node.op_type == "DequantizeLinear" and len(node.input) > 2 and bool(node.input[2])


def topological_sort(graph) -> None:
    """Producers before consumers (the converter and the fold append nodes at the end)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        blocked = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                blocked.append(node)
        if len(blocked) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input at node {blocked[0].name!r}")
        pending = blocked
    del graph.node[:]
    graph.node.extend(ordered)


def fold_zero_points(model) -> int:
    """Rewrite every blocked 4-bit DequantizeLinear with a zero point as described above; returns
    how many. Each must feed only MatMuls as their weight (Kiln's exported linears do)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers = consumers_of(graph)
    folded = 0
    for dq in [n for n in graph.node if has_zero_point(n)]:
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        codes_t, scales_t, zeros_t = (inits[name] for name in dq.input[:3])
        if codes_t.data_type != TensorProto.UINT4 or attrs.get("axis") != 0 or not attrs.get("block_size"):
            raise ValueError(f"{dq.name}: only blocked uint4 codes on axis 0 can be folded")
        users = consumers.get(dq.output[0], [])
        if not users or any(u.op_type != "MatMul" or u.input[1] != dq.output[0] for u in users):
            raise ValueError(f"{dq.name}: its output must feed only MatMuls as their weight")
        block = attrs["block_size"]
        codes = numpy_helper.to_array(codes_t).astype(np.int16)
        zeros = numpy_helper.to_array(zeros_t).astype(np.int16)
        scales = numpy_helper.to_array(scales_t).astype(np.float32)
        groups = codes.shape[0] // block

        codes_t.CopyFrom(int_tensor(codes_t.name, codes - 8, 4, signed=True))
        del dq.input[2]
        offset = f"{dq.name}/zero_point_offset"
        shape = f"{dq.name}/group_shape"
        axes = f"{dq.name}/last_axis"
        graph.initializer.extend([
            numpy_helper.from_array(((8 - zeros) * scales).astype(np.float32), offset),
            numpy_helper.from_array(np.array([0, 0, groups, block], dtype=np.int64), shape),  # x is [batch, seq, K]
            numpy_helper.from_array(np.array([-1], dtype=np.int64), axes),
        ])
        for mm in users:
            out, x = mm.output[0], mm.input[0]
            mm.output[0] = f"{mm.name}/signed_out"
            sums = f"{mm.name}/group_sums"
            graph.node.extend([
                helper.make_node("Reshape", [x, shape], [f"{mm.name}/grouped"], name=f"{mm.name}/group"),
                helper.make_node("ReduceSum", [f"{mm.name}/grouped", axes], [sums], name=f"{mm.name}/sum", keepdims=0),
                helper.make_node("MatMul", [sums, offset], [f"{mm.name}/offset_out"], name=f"{mm.name}/offset"),
                helper.make_node("Add", [mm.output[0], f"{mm.name}/offset_out"], [out], name=f"{mm.name}/add_offset"),
            ])
        folded += 1
    still_used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    topological_sort(graph)
    return folded


def rms_statistics_nodes(graph) -> list[str]:
    """Names of the nodes of every RMSNorm statistics chain, found by following each Pow's consumers."""
    consumers = consumers_of(graph)
    names = []
    for pow_node in (n for n in graph.node if n.op_type == "Pow"):
        chain, node = [pow_node.name], pow_node
        for op_type in RMS_CHAIN:
            node = next((c for c in consumers.get(node.output[0], []) if c.op_type == op_type), None)
            if node is None:
                break
            chain.append(node.name)
        else:
            names += chain
    return names


def drop_cast_round_trips(graph) -> int:
    """The converter casts every kept-fp32 node's output to fp16 and back before the next kept-fp32
    node; drop those fp32 → fp16 → fp32 round trips (they are what overflowed) so the chain stays
    fp32 end to end. Returns how many consumers were rewired."""
    def cast_to(node):
        return next((helper.get_attribute_value(a) for a in node.attribute if a.name == "to"), None)

    consumers = consumers_of(graph)
    graph_outputs = {o.name for o in graph.output}
    rewired, dropped = 0, set()
    for down in [n for n in graph.node if n.op_type == "Cast" and cast_to(n) == TensorProto.FLOAT16]:
        ups = [c for c in consumers.get(down.output[0], []) if c.op_type == "Cast" and cast_to(c) == TensorProto.FLOAT]
        for up in ups:
            if up.output[0] in graph_outputs:
                continue
            for user in consumers.get(up.output[0], []):
                for i, name in enumerate(user.input):
                    if name == up.output[0]:
                        user.input[i] = down.input[0]
                        rewired += 1
            dropped.add(up.name)
    still_used = {name for node in graph.node if node.name not in dropped for name in node.input}
    kept = [n for n in graph.node if n.name not in dropped
            and not (n.op_type == "Cast" and n.output[0] not in still_used and n.output[0] not in graph_outputs)]
    del graph.node[:]
    graph.node.extend(kept)
    return rewired


def to_fp16(model):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    typed = convert_float_to_float16(model, keep_io_types=list(KEEP_FP32_IO), op_block_list=list(KEEP_FP32_OPS),
                                     node_block_list=rms_statistics_nodes(model.graph))
    drop_cast_round_trips(typed.graph)
    topological_sort(typed.graph)
    return typed


def write_tensorrt_graph(model_file, precision: str, out_file) -> int:
    """Fold zero points, then write the graph at `precision` (fp32 | fp16), weights in one external
    file. Returns the number of folded layers."""
    import onnx

    model = onnx.load(str(model_file))
    folded = fold_zero_points(model)
    if precision == "fp16":
        model = to_fp16(model)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(out_file), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=out_file.name + ".data", size_threshold=1024)
    return folded
