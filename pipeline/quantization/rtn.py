"""Round-to-nearest group-wise weight quantization: the baseline every other method must beat."""

from __future__ import annotations

import numpy as np

from pipeline.quantization.format import QuantizedLinear


def quantize_rtn(weight: np.ndarray, bits: int, group_size: int, symmetric: bool) -> QuantizedLinear:
    """Quantize a [out, in] float weight in groups of `group_size` input columns.

    Asymmetric: unsigned codes 0..2^b-1 with a zero point, the group's [min, max] mapped onto the
    code range (0 always representable). Symmetric: signed codes -2^(b-1)..2^(b-1)-1, scale
    absmax / (2^(b-1)-1), no zero point.
    """
    out_f, in_f = weight.shape
    if in_f % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_f}")
    w = weight.astype(np.float32).reshape(out_f, in_f // group_size, group_size)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        absmax = np.abs(w).max(axis=2)
        scales = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
        codes = np.clip(np.rint(w / scales[..., None]), -qmax - 1, qmax).astype(np.int8)
        zeros = None
    else:
        qmax = 2**bits - 1
        lo = np.minimum(w.min(axis=2), 0.0)
        hi = np.maximum(w.max(axis=2), 0.0)
        scales = np.where(hi > lo, (hi - lo) / qmax, 1.0).astype(np.float32)
        zeros_f = np.clip(np.rint(-lo / scales), 0, qmax)
        codes = np.clip(np.rint(w / scales[..., None]) + zeros_f[..., None], 0, qmax).astype(np.uint8)
        zeros = zeros_f.astype(np.uint8)
    return QuantizedLinear(
        codes=codes.reshape(out_f, in_f), scales=scales, zeros=zeros, bits=bits, group_size=group_size
    )
