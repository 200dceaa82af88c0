"""GPTQ and AWQ through llm-compressor (`oneshot` with `GPTQModifier` / `AWQModifier`), converted
to Kiln's format exactly.

After `oneshot`, each quantized Linear carries `weight_scale` and signed `weight_zero_point`;
llm-compressor's own dequantized weight is compressed-tensors' `fake_quantize(weight, ...)`
(GPTQ leaves the weight already on the grid; AWQ leaves a smoothed float weight). Kiln computes
the signed codes the same way and stores uint codes and zero points shifted by 2^(bits-1), which
leaves (q - zp) unchanged: `to_kiln` proves the result equals `fake_quantize` bit for bit, and
refuses otherwise. AWQ also rescales float tensors outside the quantized layers (the RMSNorm
weights); those are found by comparison with the source and returned as overrides.

Memory: the model is loaded once, in the checkpoint's own precision (a bf16 checkpoint stays
bf16), and calibrated with llm-compressor's sequential pipeline: one decoder layer's inputs are
cached and its Hessians (GPTQ: float32 [in, in] per Linear) or activation statistics (AWQ) built at a
time. Its peak is therefore the whole model plus one layer's work, not one layer: on a CPU host
there is no accelerator to onload layers onto, so the model stays resident (docs/decisions.md).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from pipeline.errors import StageFailed
from pipeline.memory import peak_rss_mb
from pipeline.modeling.hf import SafetensorsWeights, checkpoint_dtype, load_causal_lm
from pipeline.processes import die_with_parent
from pipeline.quantization import RESCALES_FLOAT_MODEL, QuantizerOutput
from pipeline.quantization.format import QuantizedLinear, load_quantized, save_quantized


def weight_args(cfg, act_order: bool = False):
    from compressed_tensors.quantization import QuantizationArgs

    # actorder "weight" reorders columns while solving but keeps groups contiguous, which ONNX's
    # blocked DequantizeLinear needs; "group" act order would scatter group membership (g_idx).
    return QuantizationArgs(num_bits=cfg.bits, type="int", symmetric=cfg.symmetric, strategy="group",
                            group_size=cfg.group_size, actorder="weight" if act_order else None)


def to_kiln(module, cfg) -> QuantizedLinear:
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    bits, group = cfg.bits, cfg.group_size
    w = module.weight.detach().float()
    scale = module.weight_scale.detach().float()
    zp = module.weight_zero_point.detach()
    reference = fake_quantize(w, scale, zp, weight_args(cfg))  # llm-compressor's own dequantized weight
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s_full, z_full = scale.repeat_interleave(group, 1), zp.to(torch.int32).repeat_interleave(group, 1).float()
    q = torch.clamp(torch.round(w / s_full + z_full), lo, hi)
    if not torch.equal((q - z_full) * s_full, reference):
        worst = float(((q - z_full) * s_full - reference).abs().max())
        raise ValueError(f"codes do not reproduce llm-compressor's dequantized weight (max |Δ| {worst:.3g})")
    if cfg.symmetric:
        if torch.any(zp != 0):
            raise ValueError("symmetric scheme returned non-zero zero points")
        return QuantizedLinear(q.numpy().astype(np.int8), scale.numpy(), None, bits, group)
    offset = 2 ** (bits - 1)
    zeros = (zp.to(torch.int32) + offset).numpy().astype(np.uint8)
    return QuantizedLinear((q + offset).numpy().astype(np.uint8), scale.numpy(), zeros, bits, group)


@contextlib.contextmanager
def cpu_without_pinning():
    """llm-compressor 0.14.0.1's AWQ pins cached activations (`Tensor.pin_memory`), which raises
    "Cannot access accelerator device when none is available" on a CPU-only machine. Pinning only
    speeds host-to-device copies, so with no accelerator it is skipped; nothing else changes."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


def changed_float_tensors(model, model_dir, quantized_layers: set[str]) -> dict[str, np.ndarray]:
    """Float tensors of the model that differ from the source checkpoint, other than the quantized
    layers' own weights (e.g. AWQ folds its scales into the RMSNorm weights)."""
    source = SafetensorsWeights(model_dir)
    changed = {}
    for name, tensor in model.state_dict().items():
        if name not in source or (name.endswith(".weight") and name.removesuffix(".weight") in quantized_layers):
            continue
        current = tensor.detach().float().numpy()
        if not np.array_equal(current, source[name]):
            changed[name] = current.copy()
    return changed


def _oneshot(model_dir, layers, cfg, calibration, modifier_for, advance) -> QuantizerOutput:
    from compressed_tensors.quantization import QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from loguru import logger

    logger.disable("llmcompressor")  # its per-layer METRIC lines drown the run log
    model = load_causal_lm(model_dir, dtype=checkpoint_dtype(model_dir))
    modules = dict(model.named_modules())
    ignore = [n for n, m in modules.items() if type(m).__name__ == "Linear" and n not in layers]
    scheme = QuantizationScheme(targets=["Linear"], weights=weight_args(cfg, act_order=cfg.method == "gptq" and cfg.gptq.act_order))
    data = Dataset.from_dict({"input_ids": calibration, "attention_mask": [[1] * len(s) for s in calibration]})
    with cpu_without_pinning():
        oneshot(model=model, dataset=data, recipe=modifier_for({"kiln": scheme}, ignore),
                max_seq_length=max(len(s) for s in calibration), num_calibration_samples=len(calibration),
                pipeline="sequential")
    out = {}
    for name in layers:
        out[name] = to_kiln(modules[name], cfg)
        advance(1)
    float_weights = {name: modules[name].weight.detach().float().numpy().copy() for name in layers} if cfg.method in RESCALES_FLOAT_MODEL else {}
    return QuantizerOutput(out, changed_float_tensors(model, model_dir, set(layers)), float_weights)


def gptq_modifier(cfg):
    from llmcompressor.modifiers.quantization import GPTQModifier

    return lambda groups, ignore: GPTQModifier(config_groups=groups, ignore=ignore,
                                               dampening_frac=cfg.gptq.dampening_frac, block_size=128)


def awq_modifier(cfg):
    from llmcompressor.modifiers.awq import AWQModifier

    return lambda groups, ignore: AWQModifier(config_groups=groups, ignore=ignore, n_grid=cfg.awq.n_grid,
                                              duo_scaling=cfg.awq.duo_scaling)


MODIFIERS = {"gptq": gptq_modifier, "awq": awq_modifier}


def quantize_in_child(model_dir: Path, layers: list[str], cfg, calibration, advance, scratch: Path | None = None) -> QuantizerOutput:
    """`oneshot` in a child process that writes its results to files and exits. llm-compressor
    keeps the calibrated model alive after `oneshot` returns (the functions it generates while
    tracing the model for its sequential pipeline hold it), so in this process the whole model
    stayed resident through the report and every later stage: 2.2 GB under each of them on the 1B
    shapes (measured). A process that ends frees all of it."""
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"model_dir": str(model_dir), "layers": layers, "config": cfg.model_dump(mode="json"),
                                   "calibration": [[int(t) for t in s] for s in calibration], "out": tmp}))
        # the child's own progress (llm-compressor's per-layer bars) goes to this process's stderr
        proc = subprocess.run([sys.executable, "-m", "pipeline.quantization.llmcompressor_backend", str(job)],
                              stdout=subprocess.PIPE, text=True, preexec_fn=die_with_parent)
        if proc.returncode != 0:
            raise StageFailed("quantize", f"{cfg.method} through llm-compressor failed in its process (exit {proc.returncode}; "
                                          "its error is printed above)")
        result = load_result(Path(tmp))
    advance(len(layers))
    return result


def save_result(out: Path, result: QuantizerOutput) -> None:
    from safetensors.numpy import save_file

    save_quantized(out / "layers.safetensors", result.layers, {"method": "child"})
    save_file({**{f"override:{k}": v for k, v in result.overrides.items()},
               **{f"float:{k}": v for k, v in result.float_weights.items()}}, str(out / "floats.safetensors"))
    (out / "peak.json").write_text(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def load_result(out: Path) -> QuantizerOutput:
    from safetensors.numpy import load_file

    floats = load_file(str(out / "floats.safetensors"))
    return QuantizerOutput(load_quantized(out / "layers.safetensors"),
                           {k.removeprefix("override:"): v for k, v in floats.items() if k.startswith("override:")},
                           {k.removeprefix("float:"): v for k, v in floats.items() if k.startswith("float:")},
                           child_peak_rss_mb=json.loads((out / "peak.json").read_text())["peak_rss_mb"])


def main() -> None:
    from pipeline.recipe import QuantizeConfig

    job = json.loads(Path(sys.argv[1]).read_text())
    cfg = QuantizeConfig.model_validate(job["config"])
    result = _oneshot(Path(job["model_dir"]), job["layers"], cfg, job["calibration"], MODIFIERS[cfg.method](cfg), lambda _n: None)
    save_result(Path(job["out"]), result)


if __name__ == "__main__":
    main()
