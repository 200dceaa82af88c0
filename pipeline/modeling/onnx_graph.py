"""The small ONNX-building layer under Kiln's graph writers: unique node names, shared constants,
int4 tensors in ONNX's packed layout, blocked `DequantizeLinear` weights from the quantizer's own
codes (so nothing is quantized twice), and initializers streamed to the external-data file as they
are made (`ExternalData`), so a graph writer never holds a model's weights at all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.quantization.format import QuantizedLinear, pack_nibbles

OPSET = 21
IR_VERSION = 10  # ONNX IR 10 is the first with int4/uint4 tensors


def int_tensor(name: str, values: np.ndarray, bits: int, signed: bool) -> TensorProto:
    if bits == 4:
        dtype = TensorProto.INT4 if signed else TensorProto.UINT4
        return helper.make_tensor(name, dtype, values.shape, pack_nibbles(values).tobytes(), raw=True)  # ONNX's raw int4 layout
    arr = values.astype(np.int8 if signed else np.uint8)
    return numpy_helper.from_array(arr, name)


class ExternalData:
    """The external-data file of a model being written: each initializer of at least `threshold`
    bytes is appended to it when it is made and its proto keeps only the (location, offset,
    length) reference, the layout `onnx.save_model(..., save_as_external_data=True)` writes."""

    def __init__(self, model_file: Path, threshold: int = 1024):
        self.path = model_file.with_name(model_file.name + ".data")
        self.threshold = threshold
        self.offset = 0
        self._file = open(self.path, "wb")

    def store(self, tensor: TensorProto) -> TensorProto:
        """The tensor to put in the graph: `tensor` itself when small, else a new proto holding only
        the reference (protobuf keeps a message's bytes until the message itself is freed, so
        clearing `raw_data` in place would keep every weight in memory until the graph is done)."""
        data = tensor.raw_data
        if len(data) < self.threshold:
            return tensor
        return self._append(data, tensor.name, tensor.data_type, tensor.dims)

    def store_array(self, name: str, array: np.ndarray) -> TensorProto | None:
        """A large numpy initializer written straight from its buffer (no bytes copy, no proto
        holding the data); None when it is small enough to stay inside the graph."""
        if array.nbytes < self.threshold:
            return None
        array = np.ascontiguousarray(array)
        return self._append(memoryview(array).cast("B"), name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape)

    def _append(self, data, name: str, data_type: int, dims) -> TensorProto:
        """Write the bytes at the end of the file; the proto that points at them."""
        self._file.write(data)
        ref = TensorProto(name=name, data_type=data_type, dims=dims, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(len(data)))):
            entry = ref.external_data.add()
            entry.key, entry.value = key, value
        self.offset += len(data)
        return ref

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ExternalData":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_initializer(tensor: TensorProto, base_dir: Path | None) -> np.ndarray:
    """An initializer's values, from the external-data file when it lives there; the proto itself
    is left without its data (reading into a copy), so reading every tensor once holds none."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    copy = TensorProto()
    copy.CopyFrom(tensor)
    return numpy_helper.to_array(copy, base_dir=str(base_dir))


def save_streamed(model: onnx.ModelProto, model_file: Path) -> None:
    """Save a model whose large initializers `ExternalData` already wrote beside it."""
    onnx.save_model(model, str(model_file))


class GraphBuilder:
    """Just enough graph building to keep the model code readable: unique names, constants, and
    (with `external`) initializers written to disk as they come."""

    def __init__(self, external: ExternalData | None = None) -> None:
        self.external = external
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._count = 0
        self._consts: dict[tuple, str] = {}

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def init(self, name: str, tensor: TensorProto | np.ndarray) -> str:
        if isinstance(tensor, np.ndarray):
            stored = self.external.store_array(name, tensor) if self.external is not None else None
            if stored is not None:
                self.initializers.append(stored)
                return name
            tensor = numpy_helper.from_array(tensor, name)
        tensor.name = name
        if self.external is not None:
            tensor = self.external.store(tensor)
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


