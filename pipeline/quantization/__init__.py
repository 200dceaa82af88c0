"""Quantizer backends behind one small interface, chosen by `quantize.method` in the recipe.

A quantizer gets the float model, the names of the Linear layers to quantize, the recipe section
and (for calibration-based methods) token-id samples, and returns a `QuantizedLinear` (codes,
scales, zero points) per layer. It may also change other float tensors of the model in place
(AWQ rescales norms); the quantize stage records those as overrides. A method in
`RESCALES_FLOAT_MODEL` leaves the rescaled float weights of the quantized layers in the model. Export and validation never depend on the method.
`BACKEND_REQUIREMENTS` says, without importing anything, what each backend needs.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable, Iterable, Protocol

from pipeline.errors import MissingDependency
from pipeline.quantization.format import QuantizedLinear
from pipeline.quantization.rtn import quantize_rtn


class Quantizer(Protocol):
    def __call__(self, model: Any, layers: list[str], cfg: Any, calibration: list[list[int]] | None,
                 advance: Callable[[int], None]) -> dict[str, QuantizedLinear]: ...


def rtn_quantizer(model, layers, cfg, calibration, advance):
    modules = dict(model.named_modules())
    out = {}
    for name in layers:
        out[name] = quantize_rtn(modules[name].weight.detach().float().numpy(), cfg.bits, cfg.group_size, cfg.symmetric)
        advance(1)
    return out


def llmcompressor_gptq(model, layers, cfg, calibration, advance):
    from pipeline.quantization.llmcompressor_backend import gptq

    return gptq(model, layers, cfg, calibration, advance)


def llmcompressor_awq(model, layers, cfg, calibration, advance):
    from pipeline.quantization.llmcompressor_backend import awq

    return awq(model, layers, cfg, calibration, advance)


# (method, backend) -> quantizer. "none" is handled by the stage: it quantizes nothing.
QUANTIZERS: dict[tuple[str, str], Quantizer] = {
    ("rtn", "kiln"): rtn_quantizer,
    ("gptq", "llm-compressor"): llmcompressor_gptq,
    ("awq", "llm-compressor"): llmcompressor_awq,
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
