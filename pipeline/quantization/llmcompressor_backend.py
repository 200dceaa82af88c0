"""GPTQ through llm-compressor (`GPTQModifier` + `oneshot`), converted to Kiln's format exactly.

llm-compressor leaves each quantized Linear with its fake-quantized weight W = (q - zp) * scale,
signed int4 codes q in [-8, 7] and signed zero points. Kiln stores uint4 codes with uint4 zero
points: adding 8 to both leaves (q - zp) unchanged, so the ONNX weights equal llm-compressor's
bit for bit; `to_kiln` checks that and refuses otherwise.
"""

from __future__ import annotations

import numpy as np

from pipeline.quantization.format import QuantizedLinear


def scheme_for(cfg):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    # actorder "weight" reorders columns while solving but keeps groups contiguous, which ONNX's
    # blocked DequantizeLinear needs; "group" act order would scatter group membership (g_idx).
    weights = QuantizationArgs(num_bits=cfg.bits, type="int", symmetric=cfg.symmetric, strategy="group",
                               group_size=cfg.group_size, actorder="weight" if cfg.gptq.act_order else None)
    return QuantizationScheme(targets=["Linear"], weights=weights)


def to_kiln(module, bits: int, group_size: int, symmetric: bool) -> QuantizedLinear:
    import torch

    w = module.weight.detach().float()
    scale = module.weight_scale.detach().float()
    zp = module.weight_zero_point.detach().to(torch.int32)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s_full, z_full = scale.repeat_interleave(group_size, 1), zp.repeat_interleave(group_size, 1).float()
    q = torch.clamp(torch.round(w / s_full + z_full), lo, hi)
    if not torch.equal((q - z_full) * s_full, w):
        worst = float(((q - z_full) * s_full - w).abs().max())
        raise ValueError(f"llm-compressor weights are not (q - zp) * scale on the int{bits} grid (max |Δ| {worst:.3g})")
    if symmetric:
        if torch.any(zp != 0):
            raise ValueError("symmetric scheme returned non-zero zero points")
        return QuantizedLinear(q.numpy().astype(np.int8), scale.numpy(), None, bits, group_size)
    offset = 2 ** (bits - 1)
    return QuantizedLinear((q + offset).numpy().astype(np.uint8), scale.numpy(), (zp + offset).numpy().astype(np.uint8),
                           bits, group_size)


def gptq(model, layers, cfg, calibration, advance):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from loguru import logger

    logger.disable("llmcompressor")  # its per-layer METRIC lines drown the run log
    modules = dict(model.named_modules())
    ignore = [n for n, m in modules.items() if type(m).__name__ == "Linear" and n not in layers]
    seq_len = max(len(s) for s in calibration)
    data = Dataset.from_dict({"input_ids": calibration, "attention_mask": [[1] * len(s) for s in calibration]})
    modifier = GPTQModifier(config_groups={"kiln": scheme_for(cfg)}, ignore=ignore, dampening_frac=cfg.gptq.dampening_frac,
                            block_size=128)
    oneshot(model=model, dataset=data, recipe=modifier, max_seq_length=seq_len, num_calibration_samples=len(calibration))
    out = {}
    for name in layers:
        out[name] = to_kiln(modules[name], cfg.bits, cfg.group_size, cfg.symmetric)
        advance(1)
    return out
