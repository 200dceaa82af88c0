"""Where a graph writer gets a decoder's tensors, by the spec's logical names.

- `CheckpointWeights`: the HF checkpoint (safetensors, plus a quantizer's float overrides) and the
  quantizer's codes, keyed by HF module names; fused HF modules (`qkv_proj`, `gate_up_proj`) are
  split by rows here, codes unchanged (each output row has its own scales and zero points).
- `OnnxWeights`: the tensors of a graph Kiln exported, read back under the logical names the
  exporter gave them (so `build` rewrites the exported graph from its own tensors).

Norm weights come back as the multiplier a graph applies: (offset + w) for Gemma's (1 + w) norms,
folded once by `CheckpointWeights` and stored folded in the exported graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
from onnx import TensorProto

from pipeline.modeling.decoder import DecoderSpec
from pipeline.modeling.onnx_graph import read_initializer
from pipeline.quantization.format import QuantizedLinear


@dataclass(frozen=True)
class Linear:
    """One logical projection: int codes or a float weight [out, in], and an optional bias [out]."""

    name: str
    quantized: QuantizedLinear | None
    weight: np.ndarray | None
    bias: np.ndarray | None
    # the head of a tied checkpoint, kept in float: its weight is the embedding table (stored once)
    tied: bool = False

    @property
    def out_features(self) -> int:
        return (self.quantized.codes if self.quantized is not None else self.weight).shape[0]


def row_slice(q: QuantizedLinear, rows: tuple[int, int]) -> QuantizedLinear:
    a, b = rows
    return QuantizedLinear(codes=q.codes[a:b], scales=q.scales[a:b], zeros=None if q.zeros is None else q.zeros[a:b],
                           bits=q.bits, group_size=q.group_size)


class CheckpointWeights:
    def __init__(self, spec: DecoderSpec, tensors, quantized: Mapping[str, QuantizedLinear]):
        """`tensors` maps HF state-dict names to float arrays (supports `in` and `[]`)."""
        self.spec, self.tensors, self.quantized = spec, tensors, quantized

    def tensor(self, name: str) -> np.ndarray:
        return np.asarray(self.tensors[name], dtype=np.float32)

    def norm(self, name: str) -> np.ndarray:
        # transformers computes (offset + w) in float32 too, so folding it here is exact
        w = self.tensor(name)
        return w + np.float32(self.spec.norm_offset) if self.spec.norm_offset else w

    def linear(self, layer: int, name: str) -> Linear:
        module, rows = self.spec.projection(layer, name)
        return self._linear(module, rows, self.spec.linear_name(layer, name))

    def head(self) -> Linear:
        if "lm_head" in self.quantized or "lm_head.weight" in self.tensors:
            return self._linear("lm_head", None, "lm_head")
        return Linear("lm_head", None, self.tensor("model.embed_tokens.weight"), None, tied=True)

    def _linear(self, module: str, rows: tuple[int, int] | None, name: str) -> Linear:
        a, b = rows or (0, None)
        q = self.quantized.get(module)
        if q is not None and rows is not None:
            q = row_slice(q, rows)
        weight = None if q is not None else self.tensor(f"{module}.weight")[a:b]
        bias = self.tensor(f"{module}.bias")[a:b] if f"{module}.bias" in self.tensors else None
        return Linear(name, q, weight, bias)


class OnnxWeights:
    def __init__(self, spec: DecoderSpec, model: onnx.ModelProto | Path):
        """`model`: a loaded graph, or an exported model file whose external data is read one
        tensor at a time, when asked for."""
        self.spec = spec
        self.base_dir = None
        if isinstance(model, Path):
            self.base_dir = model.parent
            model = onnx.load(str(model), load_external_data=False)
        self.inits = {t.name: t for t in model.graph.initializer}
        self.block_size = {n.name.removesuffix("/DequantizeLinear"): next(a.i for a in n.attribute if a.name == "block_size")
                           for n in model.graph.node if n.op_type == "DequantizeLinear"}

    def array(self, name: str) -> np.ndarray:
        return read_initializer(self.inits[name], self.base_dir)

    def tensor(self, name: str) -> np.ndarray:
        return self.array(name)

    def norm(self, name: str) -> np.ndarray:
        return self.array(name)  # stored folded

    def linear(self, layer: int, name: str) -> Linear:
        return self._linear(self.spec.linear_name(layer, name))

    def head(self) -> Linear:
        head = self._linear("lm_head")
        # a tied float head is the graph's only copy of the embedding table
        tied = head.quantized is None and "model.embed_tokens.weight" not in self.inits
        return Linear(head.name, head.quantized, head.weight, head.bias, tied=tied)

    def quantized_layers(self) -> dict[str, QuantizedLinear]:
        return {name: self._quantized(name) for name in self.block_size}

    def _quantized(self, name: str) -> QuantizedLinear:
        codes = self.inits[f"{name}.qweight"]
        bits = 4 if codes.data_type in (TensorProto.INT4, TensorProto.UINT4) else 8
        zeros = self.inits.get(f"{name}.zeros")
        return QuantizedLinear(
            codes=np.ascontiguousarray(read_initializer(codes, self.base_dir).T).astype(np.int8 if zeros is None else np.uint8),
            scales=np.ascontiguousarray(self.array(f"{name}.scales").T),
            zeros=None if zeros is None else np.ascontiguousarray(read_initializer(zeros, self.base_dir).T).astype(np.uint8),
            bits=bits, group_size=self.block_size[name])

    def _linear(self, name: str) -> Linear:
        bias = self.array(f"{name}.bias") if f"{name}.bias" in self.inits else None
        if name in self.block_size:
            return Linear(name, self._quantized(name), None, bias)
        return Linear(name, None, np.ascontiguousarray(self.array(f"{name}.weight_t").T), bias)

    def rope(self, key: str) -> np.ndarray:
        return self.array(f"rope.{key}.inv_freq")
