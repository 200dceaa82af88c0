"""Kiln's own small on-disk format for quantized Linear layers (safetensors, never pickle).

For a layer `model.layers.0.mlp.up_proj` with weight [out, in] and group size G:
  `<layer>.codes`  uint8 (asymmetric, 0..2^bits-1) or int8 (symmetric) [out, in]
  `<layer>.scales` float32 [out, in/G]
  `<layer>.zeros`  uint8 [out, in/G]  (asymmetric only)
The dequantized weight is `(codes - zeros) * scales`, each group of G input columns sharing one
scale/zero point; ONNX `DequantizeLinear` (opset 21, blocked, axis 0 after transpose) computes
exactly this, so export never re-quantizes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "kiln-intq-v1"
HEADER_KEY = "kiln"


@dataclass(frozen=True)
class QuantizedLinear:
    codes: np.ndarray  # [out, in] uint8 or int8
    scales: np.ndarray  # [out, in/G] float32
    zeros: np.ndarray | None  # [out, in/G] uint8, None when symmetric
    bits: int
    group_size: int

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def dequantize(self) -> np.ndarray:
        g = self.group_size
        codes = self.codes.astype(np.float32)
        if self.zeros is not None:
            codes = codes - np.repeat(self.zeros.astype(np.float32), g, axis=1)
        return codes * np.repeat(self.scales, g, axis=1)


def save_quantized(path: Path, layers: dict[str, QuantizedLinear], meta: dict[str, str]) -> None:
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    for name, q in layers.items():
        tensors[f"{name}.codes"] = np.ascontiguousarray(q.codes)
        tensors[f"{name}.scales"] = np.ascontiguousarray(q.scales, dtype=np.float32)
        if q.zeros is not None:
            tensors[f"{name}.zeros"] = np.ascontiguousarray(q.zeros)
    any_layer = next(iter(layers.values()), None)
    header = {"format": FORMAT, **meta}
    if any_layer is not None:
        header |= {"bits": str(any_layer.bits), "group_size": str(any_layer.group_size)}
    # One metadata key holding sorted JSON: safetensors writes its metadata map in hash order, which
    # changed between identical runs (and with it the bytes and every downstream cache key).
    save_file(tensors, str(path), metadata={HEADER_KEY: json.dumps(header, sort_keys=True)})


def load_quantized(path: Path) -> dict[str, QuantizedLinear]:
    """Every layer, read tensor by tensor: each read maps the file and unmaps it again, so the
    file's pages are not counted in this process's memory on top of the arrays read from them."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        raw = f.metadata() or {}
        keys = set(f.keys())
    header = json.loads(raw[HEADER_KEY]) if HEADER_KEY in raw else raw
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file (format={header.get('format')!r})")

    def read(name: str) -> np.ndarray:
        with safe_open(str(path), framework="numpy") as f:
            return f.get_tensor(name)

    names = sorted(k.removesuffix(".codes") for k in keys if k.endswith(".codes"))
    bits, group = int(header.get("bits", 4)), int(header.get("group_size", 0))
    return {n: QuantizedLinear(codes=read(f"{n}.codes"), scales=read(f"{n}.scales"),
                               zeros=read(f"{n}.zeros") if f"{n}.zeros" in keys else None, bits=bits, group_size=group)
            for n in names}
