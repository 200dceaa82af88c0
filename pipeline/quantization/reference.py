"""PyTorch models built from the source checkpoint with some weights replaced.

`quantized_reference` is the model a quantized build should equal: the source with the quantizer's
float overrides applied and each quantized Linear's weight replaced by its dequantized value.
Export checks the ONNX graph against it; the quantize report compares its layer outputs with the
float model the codes approximate (`replaced_weights` with the float weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from pipeline.errors import KilnError
from pipeline.modeling.hf import load_causal_lm
from pipeline.quantization.format import QuantizedLinear


def load_overrides(path: Path | None) -> dict[str, np.ndarray]:
    if path is None or not path.is_file():
        return {}
    from safetensors.numpy import load_file

    return load_file(str(path))


def quantized_reference(model_dir: Path, layers: Mapping[str, QuantizedLinear], overrides: Mapping[str, np.ndarray]):
    return replaced_weights(model_dir, {name: q.dequantize() for name, q in layers.items()}, overrides)


def replaced_weights(model_dir: Path, linear_weights: Mapping[str, np.ndarray], overrides: Mapping[str, np.ndarray]):
    """The source model with `overrides` (any tensors, by state-dict name) copied in and the named
    Linear layers' weights replaced."""
    import torch

    model = load_causal_lm(model_dir)
    state = model.state_dict()
    missing = sorted(set(overrides) - set(state))
    if missing:
        raise KilnError(f"float overrides name tensors the model does not have: {missing[:5]}")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, value in overrides.items():
            state[name].copy_(torch.from_numpy(value))
        for name, weight in linear_weights.items():
            modules[name].weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)), requires_grad=False)
    return model
