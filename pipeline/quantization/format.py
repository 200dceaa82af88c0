"""Kiln's own small on-disk format for quantized Linear layers (safetensors, never pickle).

For a layer `model.layers.0.mlp.up_proj` with weight [out, in] and group size G:
  `<layer>.codes`  uint8 (asymmetric, 0..2^bits-1) or int8 (symmetric) [out, in]; 4-bit codes
                   two a byte, the first in the low nibble: uint8 [out, in/2] (ONNX's int4 layout)
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

FORMAT = "kiln-intq-v2"  # v2 packs 4-bit codes two a byte; v1 (one a byte) is still read
READABLE_FORMATS = ("kiln-intq-v1", FORMAT)
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


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """4-bit values (uint8 0..15 or int8 -8..7), flattened, two a byte with the first in the low
    nibble (ONNX's int4/uint4 raw layout; an odd count is padded with a zero nibble)."""
    flat = values.astype(np.uint8).reshape(-1) & 0x0F
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_nibbles(packed: np.ndarray, signed: bool) -> np.ndarray:
    out = np.empty((packed.shape[0], packed.shape[1] * 2), np.uint8)
    out[:, 0::2], out[:, 1::2] = packed & 0x0F, packed >> 4
    if not signed:
        return out
    return ((out.astype(np.int8) ^ 8) - 8).astype(np.int8)  # sign-extend the nibble


def save_quantized(path: Path, layers: dict[str, QuantizedLinear], meta: dict[str, str]) -> None:
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    # 4-bit codes two a byte (every layer of a file has the same bits; an odd width stays one a byte)
    per_byte = 2 if layers and all(q.bits == 4 and q.codes.shape[1] % 2 == 0 for q in layers.values()) else 1
    for name, q in layers.items():
        out_f, in_f = q.codes.shape
        tensors[f"{name}.codes"] = pack_nibbles(q.codes).reshape(out_f, in_f // 2) if per_byte == 2 else np.ascontiguousarray(q.codes)
        tensors[f"{name}.scales"] = np.ascontiguousarray(q.scales, dtype=np.float32)
        if q.zeros is not None:
            tensors[f"{name}.zeros"] = np.ascontiguousarray(q.zeros)
    any_layer = next(iter(layers.values()), None)
    header = {"format": FORMAT, **meta, "codes_per_byte": per_byte}
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
    if header.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{path} is not a {FORMAT} file (format={header.get('format')!r})")

    def read(name: str) -> np.ndarray:
        with safe_open(str(path), framework="numpy") as f:
            return f.get_tensor(name)

    names = sorted(k.removesuffix(".codes") for k in keys if k.endswith(".codes"))
    bits, group = int(header.get("bits", 4)), int(header.get("group_size", 0))
    packed = int(header.get("codes_per_byte", 1)) == 2

    def codes(name: str, signed: bool) -> np.ndarray:
        stored = read(f"{name}.codes")
        return unpack_nibbles(stored, signed) if packed else stored

    layers = {}
    for n in names:
        scales = read(f"{n}.scales")
        zeros = read(f"{n}.zeros") if f"{n}.zeros" in keys else None
        layers[n] = QuantizedLinear(codes=codes(n, zeros is None), scales=scales, zeros=zeros, bits=bits, group_size=group)
    return layers
