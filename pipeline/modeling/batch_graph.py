"""The batch-decode graph of a fused engine (`build.batch_kernel: int8_gemm`): the engine's
optimized graph with every int4 `MatMulNBits` replaced by ONNX Runtime's `DynamicQuantizeMatMul`,
the u8 x s8 GEMM that ONNX Runtime runs on AMX (or AVX-512 VNNI / AVX2, whatever the CPU has) for
decode steps of many rows, where `MatMulNBits`'s int8 path does not (measured, docs/results.md:
a 32-row decode step, engine alone, 65 -> 42 ms on an Intel CPU with AMX, 60 -> 51 ms on an AMD
EPYC without it).

Exactness is kept where it costs little:
- weights: int8 per output channel, requantized from the int4 codes and block scales the engine
  holds (nothing is quantized from the float checkpoint again);
- activations: two int8 passes, the value and what its rounding left (`x = q1 s1 + e`, `e`
  quantized again), so they are ~16-bit: one per-row int8 pass alone put the logits 17 % of
  their largest value from exact math on SmolLM2 text, against 4.3 % for the decode kernel's own
  per-block int8 activations; two passes land where the weights' requantization alone does
  (docs/decisions.md).

The rest of the graph (attention, norms, embedding) and its weights are the engine's: the new
graph file references the engine's weights file for them and writes only the int8 weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pipeline.modeling.onnx_graph import ExternalData, read_initializer
from pipeline.quantization.format import unpack_nibbles

MS_DOMAIN = "com.microsoft"


class UnsupportedMatMul(ValueError):
    """A `MatMulNBits` this rewrite does not handle (it names what)."""


def int4_matmul_weight(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto], base_dir: Path) -> np.ndarray:
    """The float [K, N] weight a 4-bit `MatMulNBits` computes with: scale x (code - zero point) per block."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("bits", 4) != 4:
        raise UnsupportedMatMul(f"{node.name}: {attrs['bits']}-bit MatMulNBits (only 4-bit is rewritten)")
    if len(node.input) > 4 and node.input[4]:
        raise UnsupportedMatMul(f"{node.name}: MatMulNBits with g_idx (act-order) is not rewritten")
    k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
    blocks = -(-k // block)
    packed = read_initializer(initializers[node.input[1]], base_dir).reshape(n * blocks, block // 2)
    codes = unpack_nibbles(packed, signed=False).reshape(n, blocks, block).astype(np.float32)
    scales = read_initializer(initializers[node.input[2]], base_dir).reshape(n, blocks).astype(np.float32)
    if len(node.input) > 3 and node.input[3]:
        zeros = read_initializer(initializers[node.input[3]], base_dir)
        if zeros.dtype != np.uint8:
            raise UnsupportedMatMul(f"{node.name}: float zero points are not rewritten")
        zeros = unpack_nibbles(zeros.reshape(n, -1), signed=False)[:, :blocks].astype(np.float32)
    else:
        zeros = np.full((n, blocks), 8, dtype=np.float32)  # MatMulNBits' default for 4 bits
    return (scales[..., None] * (codes - zeros[..., None])).reshape(n, blocks * block)[:, :k].T


def per_channel_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel (column) of a [K, N] weight: codes and scales."""
    scales = np.maximum(np.abs(weight).max(axis=0), np.finfo(np.float32).tiny) / 127
    return np.clip(np.round(weight / scales), -127, 127).astype(np.int8), scales.astype(np.float32)


def two_pass_matmul(prefix: str, x: str, y: str, weight: str, scales: str, bias: str | None) -> list[onnx.NodeProto]:
    """y = x W as two int8 GEMMs: x's per-tensor int8 value, then what its rounding left."""
    names = {key: f"{prefix}/{key}" for key in ("q", "scale", "zero", "rounded", "rest", "y_value", "y_rest", "sum")}
    return [
        helper.make_node("DynamicQuantizeLinear", [x], [names["q"], names["scale"], names["zero"]], name=f"{prefix}/quantize"),
        helper.make_node("DequantizeLinear", [names["q"], names["scale"], names["zero"]], [names["rounded"]], name=f"{prefix}/dequantize"),
        helper.make_node("Sub", [x, names["rounded"]], [names["rest"]], name=f"{prefix}/rest"),
        helper.make_node("DynamicQuantizeMatMul", [x, weight, scales], [names["y_value"]], name=f"{prefix}/value", domain=MS_DOMAIN),
        helper.make_node("DynamicQuantizeMatMul", [names["rest"], weight, scales], [names["y_rest"]], name=f"{prefix}/rest_matmul",
                         domain=MS_DOMAIN),
        helper.make_node("Add", [names["y_value"], names["y_rest"]], [names["sum"] if bias else y], name=f"{prefix}/sum"),
    ] + ([helper.make_node("Add", [names["sum"], bias], [y], name=f"{prefix}/bias")] if bias else [])


def write_batch_graph(engine_file: Path, out_file: Path) -> int:
    """Write the batch-decode graph of the optimized engine `engine_file` beside it (`out_file`
    in the same folder: it references the engine's weights file); returns how many matmuls were
    rewritten. One weight at a time is held."""
    if engine_file.parent != out_file.parent:
        raise ValueError("the batch graph must sit beside the engine: it reads the engine's weights file")
    model = onnx.load(str(engine_file), load_external_data=False)
    initializers = {t.name: t for t in model.graph.initializer}
    nodes, new_initializers, rewritten = [], [], 0
    external = ExternalData(out_file)
    try:
        for node in model.graph.node:
            if node.op_type != "MatMulNBits" or node.domain != MS_DOMAIN:
                nodes.append(node)
                continue
            codes, scales = per_channel_int8(int4_matmul_weight(node, initializers, engine_file.parent))
            prefix = node.name or node.output[0]
            weight_name, scales_name = f"{prefix}/weight_int8", f"{prefix}/weight_scales"
            for name, array in ((weight_name, codes), (scales_name, scales)):
                new_initializers.append(external.store_array(name, array) or numpy_helper.from_array(array, name))
            bias = node.input[5] if len(node.input) > 5 and node.input[5] else None
            nodes += two_pass_matmul(prefix, node.input[0], node.output[0], weight_name, scales_name, bias)
            rewritten += 1
    except BaseException:  # a matmul it cannot rewrite: no half-written weights file beside the engine
        external.close()
        external.path.unlink(missing_ok=True)
        raise
    external.close()
    used = {name for node in nodes for name in node.input}
    kept = [t for t in model.graph.initializer if t.name in used]  # the engine's own, still in its weights file
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + new_initializers)
    onnx.save_model(model, str(out_file))
    return rewritten
