"""Quantizer backends behind one small interface, chosen by `quantize.method` in the recipe.

A quantizer takes the float weights of the Linear layers to quantize and returns, per layer,
a `QuantizedLinear` (codes, scales, zero points). Calibration-based methods (GPTQ, AWQ) plug in
here with the same output, so export and validation never depend on the method.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Protocol

import numpy as np

from pipeline.quantization.format import QuantizedLinear
from pipeline.quantization.rtn import quantize_rtn


class Quantizer(Protocol):
    def __call__(
        self,
        weights: Mapping[str, np.ndarray],
        *,
        bits: int,
        group_size: int,
        symmetric: bool,
        advance: Callable[[int], None],
    ) -> dict[str, QuantizedLinear]: ...


def rtn_quantizer(weights, *, bits, group_size, symmetric, advance):
    out = {}
    for name, w in weights.items():
        out[name] = quantize_rtn(w, bits, group_size, symmetric)
        advance(1)
    return out


# `quantize.method` -> backend. "none" is handled by the stage: it quantizes nothing.
QUANTIZERS: dict[str, Quantizer] = {"rtn": rtn_quantizer}


def is_ignored(layer: str, ignore: Iterable[str]) -> bool:
    """A layer is ignored if a pattern equals its name or its dotted suffix (`lm_head`, `mlp.down_proj`)."""
    return any(layer == p or layer.endswith("." + p) for p in ignore)
