"""PyTorch models of the source checkpoint with some Linear weights replaced, computing in float32,
built tensor by tensor so that no stage ever holds the model twice.

`quantized_reference` is the model a quantized build should equal: the source with the quantizer's
float overrides applied and each quantized Linear computing with its dequantized weight. Export
checks the ONNX graph against it; the quantize report compares its layer outputs with the float
model the codes approximate (`float_reference`).

Memory: the model is built on the meta device and each tensor is assigned from the checkpoint
(widened to float32, exactly). A quantized layer keeps only its codes, scales and zero points and
dequantizes in its forward; a `streamed` float layer keeps nothing and reads its weight from the
checkpoint in its forward. So the resident size is the float tensors Kiln keeps in float (embedding,
norms, an ignored head), the codes, and one layer's weight at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from pipeline.errors import KilnError
from pipeline.modeling.hf import SafetensorsWeights, empty_causal_lm
from pipeline.quantization.format import QuantizedLinear


def load_overrides(path: Path | None) -> dict[str, np.ndarray]:
    if path is None or not path.is_file():
        return {}
    from safetensors.numpy import load_file

    return load_file(str(path))


def _linear_module():
    import torch

    class DequantizedLinear(torch.nn.Module):
        """y = x · ((codes − zeros) · scales)ᵀ + bias, the weight rebuilt in float32 at each call."""

        def __init__(self, q: QuantizedLinear, bias):
            super().__init__()
            self.group_size = q.group_size
            # the codes are shared with the caller's arrays (the bulk of the memory); scales and zero
            # points are small and copied, so changing them here never changes the caller's layer
            self.register_buffer("codes", torch.from_numpy(np.ascontiguousarray(q.codes)), persistent=False)
            self.register_buffer("scales", torch.tensor(q.scales, dtype=torch.float32), persistent=False)
            zeros = None if q.zeros is None else torch.tensor(q.zeros)
            self.register_buffer("zeros", zeros, persistent=False)
            self.bias = bias

        @property
        def weight(self):
            codes = self.codes.float()
            if self.zeros is not None:
                codes = codes - self.zeros.float().repeat_interleave(self.group_size, 1)
            return codes * self.scales.repeat_interleave(self.group_size, 1)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight, self.bias)

    class StreamedLinear(torch.nn.Module):
        """A float Linear whose weight stays in the checkpoint until its forward reads it."""

        def __init__(self, tensors: SafetensorsWeights, name: str, bias):
            super().__init__()
            self.tensors, self.name, self.bias = tensors, name, bias

        @property
        def weight(self):
            from pipeline.quantization import linear_weight_name

            return self.tensors.torch_tensor(linear_weight_name(self.tensors, self.name)).float()

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight, self.bias)

    return DequantizedLinear, StreamedLinear


def build_reference(model_dir: Path, *, quantized: Mapping[str, QuantizedLinear] = {},
                    float_linears: Mapping[str, np.ndarray] = {}, streamed: Iterable[str] = (),
                    overrides: Mapping[str, np.ndarray] = {}):
    """The source model in float32 with: `quantized` layers computing from their codes,
    `float_linears` layers given their weight, `streamed` layers reading theirs from the checkpoint
    when called, and `overrides` (any tensors, by state-dict name) in place of the checkpoint's."""
    import torch

    DequantizedLinear, StreamedLinear = _linear_module()
    model = empty_causal_lm(model_dir)
    tensors = SafetensorsWeights(model_dir)
    state_names = set(model.state_dict())
    missing = sorted(set(overrides) - state_names)
    if missing:
        raise KilnError(f"float overrides name tensors the model does not have: {missing[:5]}")
    replaced = set(quantized) | set(float_linears) | set(streamed)
    modules = dict(model.named_modules())

    def value(name: str):
        if name in overrides:
            return torch.from_numpy(np.ascontiguousarray(overrides[name], dtype=np.float32))
        return tensors.torch_tensor(name).float()

    # Tensors kept in float32, one by one; a replaced layer's own weight is never read here.
    for name, _ in list(model.named_parameters()):
        owner = name.rsplit(".", 1)[0]
        if owner in replaced and name.endswith(".weight"):
            continue
        if name not in tensors and name not in overrides:
            continue  # a tied head: pointed at the embedding table just below
        module = modules[owner]
        setattr(module, name.rsplit(".", 1)[1], torch.nn.Parameter(value(name), requires_grad=False))
    if model.config.tie_word_embeddings and "lm_head" not in replaced:
        model.lm_head.weight = model.get_input_embeddings().weight
    for name in replaced:
        parent, _, child = name.rpartition(".")
        old = modules[name]
        bias = old.bias if getattr(old, "bias", None) is not None else None
        if name in quantized:
            new = DequantizedLinear(quantized[name], bias)
        elif name in float_linears:
            new = torch.nn.Linear(old.in_features, old.out_features, bias=False, device="meta")
            new.weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(float_linears[name], dtype=np.float32)),
                                            requires_grad=False)
            new.bias = bias
        else:
            new = StreamedLinear(tensors, name, bias)
        setattr(modules[parent] if parent else model, child, new)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise KilnError(f"the checkpoint in {model_dir} has no tensor for {left[:5]}")
    return model.eval()


def quantized_reference(model_dir: Path, layers: Mapping[str, QuantizedLinear], overrides: Mapping[str, np.ndarray]):
    return build_reference(model_dir, quantized=layers, overrides=overrides)


def float_reference(model_dir: Path, layers: Iterable[str], overrides: Mapping[str, np.ndarray],
                    float_linears: Mapping[str, np.ndarray] = {}):
    """The float model the codes of `layers` approximate: the source (those layers streamed from
    the checkpoint) or, for a method that rescales it, the given `float_linears` and overrides."""
    streamed = [n for n in layers if n not in float_linears]
    return build_reference(model_dir, float_linears=float_linears, streamed=streamed, overrides=overrides)
