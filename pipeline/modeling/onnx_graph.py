"""The small ONNX-building layer under Kiln's graph writers: unique node names, shared constants,
int4 tensors in ONNX's packed layout, and blocked `DequantizeLinear` weights from the quantizer's
own codes (so nothing is quantized twice)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.quantization.format import QuantizedLinear

OPSET = 21
IR_VERSION = 10  # ONNX IR 10 is the first with int4/uint4 tensors


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


