"""Quantizer backends behind one small interface, chosen by `quantize.method` in the recipe.

A quantizer gets the source checkpoint folder, the names of the Linear layers to quantize, the
recipe section, (for calibration-based methods) token-id samples and a progress callback, and
returns a `QuantizerOutput`: a `QuantizedLinear` (codes, scales, zero points) per layer, the float
tensors outside those layers it changed (AWQ rescales norms; the stage stores them as overrides) and,
for a method in `RESCALES_FLOAT_MODEL`, the rescaled float weights its codes approximate. Each
backend loads only what it needs: RTN reads one weight at a time from the safetensors files;
llm-compressor's methods load the model once, in the checkpoint's precision, in a process of their
own (`scratch`: where its results are handed over). Export and validation
never depend on the method. `BACKEND_REQUIREMENTS` says, without importing anything, what each
backend needs.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np

from pipeline.errors import MissingDependency
from pipeline.quantization.format import QuantizedLinear
from pipeline.quantization.rtn import quantize_rtn


@dataclass
class QuantizerOutput:
    layers: dict[str, QuantizedLinear]
    overrides: dict[str, np.ndarray] = field(default_factory=dict)
    float_weights: dict[str, np.ndarray] = field(default_factory=dict)
    child_peak_rss_mb: float | None = None  # a backend that ran in its own process: that process's peak


class Quantizer(Protocol):
    def __call__(self, model_dir: Path, layers: list[str], cfg: Any, calibration: list[list[int]] | None,
                 advance: Callable[[int], None], scratch: Path | None = None) -> QuantizerOutput: ...


def rtn_quantizer(model_dir, layers, cfg, calibration, advance, scratch=None):
    """Layer by layer from the checkpoint files: one float weight in memory at a time."""
    from pipeline.modeling.hf import SafetensorsWeights

    tensors = SafetensorsWeights(model_dir)
    out = {}
    for name in layers:
        out[name] = quantize_rtn(tensors[linear_weight_name(tensors, name)], cfg.bits, cfg.group_size, cfg.symmetric)
        advance(1)
    return QuantizerOutput(out)


def linear_weight_name(tensors, layer: str) -> str:
    """Where a Linear's weight is stored; a tied head's is the embedding table."""
    name = f"{layer}.weight"
    return "model.embed_tokens.weight" if layer == "lm_head" and name not in tensors else name


def llmcompressor_method(model_dir, layers, cfg, calibration, advance, scratch=None):
    """GPTQ or AWQ (`cfg.method`) through llm-compressor, in a process of its own."""
    from pipeline.quantization.llmcompressor_backend import quantize_in_child

    return quantize_in_child(model_dir, layers, cfg, calibration, advance, scratch)


# (method, backend) -> quantizer. "none" is handled by the stage: it quantizes nothing.
QUANTIZERS: dict[tuple[str, str], Quantizer] = {
    ("rtn", "kiln"): rtn_quantizer,
    ("gptq", "llm-compressor"): llmcompressor_method,
    ("awq", "llm-compressor"): llmcompressor_method,
}
# backend -> importable modules it needs (pip names in the message)
BACKEND_REQUIREMENTS: dict[str, tuple[str, ...]] = {"kiln": (), "llm-compressor": ("llmcompressor",)}
NEEDS_CALIBRATION = {"gptq", "awq"}
# Methods that first rescale the float model (AWQ moves per-channel scales between a norm or Linear
# and the Linear layers after it: the same function in float arithmetic) and then quantize the
# rescaled weights, which they leave in the model. Their codes approximate those weights, not the
# source's, so the quantize report measures each layer against the rescaled float model.
RESCALES_FLOAT_MODEL = {"awq"}


def get_quantizer(method: str, backend: str) -> Quantizer:
    missing = [m for m in BACKEND_REQUIREMENTS.get(backend, ()) if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependency(f"quantize.backend {backend!r} needs the {', '.join(missing)} package (pip install {' '.join(missing)})")
    return QUANTIZERS[(method, backend)]


def is_ignored(layer: str, ignore: Iterable[str]) -> bool:
    """A layer is ignored if a pattern equals its name or its dotted suffix (`lm_head`, `mlp.down_proj`)."""
    return any(layer == p or layer.endswith("." + p) for p in ignore)
